"""Model families and the files they load from (see :mod:`meshpy.models.source`)."""
