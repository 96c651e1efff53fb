"""What crossing NATs costs per token: SmolLM2 split over two workers, each behind its own home
router (network namespaces, nftables masquerade), served through the bootstrap node's relay;
the same with hole punching (DCUtR) on; and the same two workers on the public network,
reached directly. The End node is on the public network; a fresh mesh for each setting.

    sudo python benches/bench_nat.py [--model smollm2] [--tokens 64] [--repeats 3]

Needs root, `ip` and `nft` (see tests/fixtures/netns.py). The namespaces' links are veth pairs
on this machine (no latency: the kernel has no netem), so the figures are what the relay's
extra hop and its copying cost, not a WAN's round trips; every process shares the same 2
cores. Prints decode ms/token (median over repeats, each a fresh mesh), and how the End
node reached each worker. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import commit, machine  # noqa: E402
from meshpy.generation import model_path  # noqa: E402
from tests.fixtures.netns import HomeInternet, Network, why_not_available  # noqa: E402
from tests.test_mesh import PROMPT  # noqa: E402

SETTINGS = {
    "relayed (behind NATs, no hole punching)": {"hole_punch": False},
    "hole punching on (behind NATs)": {"hole_punch": True},
    "direct (public workers)": {"behind_nat": False},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    why = why_not_available(nat=True)
    if why is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    gguf = model_path(args.model)
    print(f"{machine()}; commit {commit()}; model {gguf.name}; 2 workers (1 thread each), End node 1 thread; "
          f"{args.tokens} greedy tokens after a warm-up; median of {args.repeats} fresh meshes")
    first_tokens = None
    for name, options in SETTINGS.items():
        times, links = [], []
        for _ in range(args.repeats):
            with Network() as net, tempfile.TemporaryDirectory(prefix="meshpy-nat-") as tmp:
                result = HomeInternet(net).serve(gguf, Path(tmp), PROMPT, args.tokens, **options)
            first_tokens = first_tokens or result["tokens"]
            times.append(result["ms_per_token"])
            workers = [w["peer"] for w in result["status"]["workers"]]
            links.append("/".join(result["links"].get(p, "?") for p in workers))
            same = result["tokens"] == first_tokens
        print(f"  {name:<42} {statistics.median(times):6.2f} ms/token  (runs: {', '.join(f'{t:.2f}' for t in times)}; "
              f"End node -> workers: {', '.join(links)}; tokens {'identical' if same else 'DIFFER'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
