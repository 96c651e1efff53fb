"""Workers behind home routers (network namespaces with nftables masquerade, no port open):
each learns it is unreachable (AutoNAT), reserves a slot on the bootstrap node's relay, and
serves through it; an End node on the public network generates the one-process tokens, relayed
and, once hole punching (DCUtR) and dials out from behind the NATs open direct paths, direct.
`status` shows which."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpy.generation import Model
from tests.fixtures.netns import HomeInternet, Network, why_not_available
from tests.test_mesh import PROMPT, greedy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(why_not_available(nat=True) is not None, reason=f"no NAT namespaces: {why_not_available(nat=True)}"),
]

N_TOKENS = 24


@pytest.fixture()
def inet() -> Iterator[HomeInternet]:
    with Network() as net:
        yield HomeInternet(net)


def test_workers_behind_nats_serve_through_the_relay(inet: HomeInternet, smollm2_gguf: Path, tmp_path: Path) -> None:
    expected = greedy(Model.load(smollm2_gguf, threads=1), PROMPT, N_TOKENS)

    relayed = inet.serve(smollm2_gguf, tmp_path / "relayed", PROMPT, N_TOKENS, hole_punch=False)
    assert relayed["tokens"] == expected
    workers = relayed["status"]["workers"]
    assert len(workers) == 2 and relayed["status"]["models"][0]["uncovered_layers"] == []
    for w in workers:
        assert w["reachability"] == "private" and w["relayed_through"] == [relayed["relay"]], w
        assert w["link"] == "relayed" and relayed["links"][w["peer"]] == "relayed"
        reachable = [a for a in w["listen_addrs"] if "/ip4/192.168." not in a and "/ip4/127." not in a]
        assert reachable and all(f"/p2p/{relayed['relay']}/p2p-circuit/" in a for a in reachable), reachable

    # Hole punching on: the two workers punch through both NATs to each other (DCUtR over
    # TCP), and each dials the public End node directly once it has reached them through the
    # relay; streams move off the relay mid-generation and the tokens stay the same.
    punched = inet.serve(smollm2_gguf, tmp_path / "punched", PROMPT, N_TOKENS, hole_punch=True)
    assert punched["tokens"] == expected
    peers = [w["peer"] for w in punched["status"]["workers"]]
    assert [punched["links"][p] for p in peers] == ["direct", "direct"], punched["links"]
    for log, other in zip(punched["worker_logs"], reversed(peers)):
        assert f"hole punched: a direct connection to {other}" in log, log

    # The same workers reachable directly: no relay, no NAT.
    direct = inet.serve(smollm2_gguf, tmp_path / "direct", PROMPT, N_TOKENS, behind_nat=False)
    assert direct["tokens"] == expected
    for w in direct["status"]["workers"]:
        assert w["reachability"] == "public" and w["link"] == "direct", w
    print(f"\nEnd node decode ms/token, SmolLM2 Q4_1 on 2 workers: relayed {relayed['ms_per_token']:.2f}, "
          f"hole punching on {punched['ms_per_token']:.2f} (links {sorted(punched['links'].values())}), "
          f"direct {direct['ms_per_token']:.2f}")
