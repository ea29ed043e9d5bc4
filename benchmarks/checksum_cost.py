"""What the checkpoint digests cost at Gemma-2-2B size: writing the files against hashing them.

Every checkpoint's completion marker records each file's SHA-256
(``sae_lens_matryoshka.io.checkpoints``), so that a file changed after the
run wrote it is refused instead of loaded. This writes a checkpoint's large
files as SAELens writes them (``save_model``: ``sae_weights.safetensors``
with safetensors; ``torch.save`` of Adam's state: ``trainer_state.pt``, two
moments per parameter), then times:

- *write*: each file's write (into the page cache, as a checkpoint is written);
- *sha256* / *re-read*: hashing each file in one thread, and only reading it
  back from the page cache (what hashing inside the write would save);
- *inline*: ``torch.save`` of the trainer state into a stream that hashes
  what it writes (the alternative to hashing afterwards);
- *mark*: ``mark_complete``, what writing a checkpoint now adds (every file,
  in parallel threads);
- *verify*: ``check_complete`` on the folder as resuming checks it, with the
  files in the page cache and, where the kernel drops them on request, read
  from disk (a resumed job on another day);
- the throughput of the standard library's other hashes on the weights file,
  one thread each (why SHA-256).

Each time is given as wall seconds and as the process's CPU seconds (user +
system, all threads): on a shared machine the CPU seconds are what the work
costs, the wall seconds what it took there.

    python benchmarks/checksum_cost.py                     # d_in 2304, d_sae 65536: 3.4 GiB in /tmp
    python benchmarks/checksum_cost.py --d-in 512 --d-sae 16384 --json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import ssl
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.io import checkpoints
from sae_lens_matryoshka.kernels.measured import cpu_model

#: the hashes whose throughput is compared (``crc32``: zlib's, not a digest, for scale)
ALGORITHMS = ("sha256", "sha1", "blake2b", "blake2s", "md5", "sha512", "sha3_256", "crc32")
FILES = ("sae_weights.safetensors", "trainer_state.pt")


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def timed(action: Callable[[], Any]) -> dict[str, float]:
    """Wall and CPU seconds (this process, every thread) of ``action()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def hash_file(path: Path, algorithm: str) -> None:
    """Read ``path`` in 1 MiB pieces into ``algorithm`` (``"read"``: read only)."""
    buffer = memoryview(bytearray(2**20))
    digest = None if algorithm in ("read", "crc32") else hashlib.new(algorithm)
    crc = 0
    with path.open("rb", buffering=0) as file:
        while count := file.readinto(buffer):
            if digest is not None:
                digest.update(buffer[:count])
            elif algorithm == "crc32":
                crc = zlib.crc32(buffer[:count], crc)


class HashingWriter(io.RawIOBase):
    """A file that hashes what is written to it (``torch.save`` writes through ``write``)."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self.file, self.digest = file, hashlib.new(checkpoints.DIGEST)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.file.write(data)


def drop_from_page_cache(paths: list[Path]) -> bool:
    """Ask the kernel to forget ``paths``' cached pages; whether it could be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
    return True


def build(d_in: int, d_sae: int) -> tuple[MatryoshkaTrainingSAE, dict[str, Any]]:
    """A float32 SAE of this size and a trainer state holding Adam's moments for it."""
    widths = sorted({max(d_sae // 32, 1), max(d_sae // 4, 1), d_sae})
    cfg = MatryoshkaTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=40, matryoshka_widths=widths)
    sae = MatryoshkaTrainingSAE(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    for param in sae.parameters():  # random moments, as after some steps
        optimizer.state[param] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.randn_like(param),
            "exp_avg_sq": torch.rand_like(param),
        }
    return sae, {"optimizer": optimizer.state_dict(), "n_training_samples": 0}


Timing = dict[str, float]


def write_checkpoint(folder: Path, d_in: int, d_sae: int) -> tuple[dict[str, Timing], Timing]:
    """Write the files into ``folder``: each one's timing, and the inline-hashed save's."""
    sae, state = build(d_in, d_sae)
    write = {
        "sae_weights.safetensors": timed(lambda: sae.save_model(folder)),
        "trainer_state.pt": timed(lambda: torch.save(state, folder / "trainer_state.pt")),
    }
    inline_path = folder.parent / "trainer_state_inline.pt"
    with inline_path.open("wb") as file:
        inline = timed(lambda: torch.save(state, HashingWriter(file)))
    inline_path.unlink()
    return write, inline


def run(args: argparse.Namespace) -> dict[str, Any]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="checksum_cost-") as scratch:
        folder = Path(scratch) / "checkpoint"
        write, inline = write_checkpoint(folder, args.d_in, args.d_sae)
        paths = {name: folder / name for name in FILES}
        sizes = {name: path.stat().st_size for name, path in paths.items()}
        sha256 = {
            name: timed(lambda p=path: hash_file(p, "sha256")) for name, path in paths.items()
        }
        reread = {name: timed(lambda p=path: hash_file(p, "read")) for name, path in paths.items()}
        weights = paths[FILES[0]]
        algorithms = {
            algorithm: timed(lambda a=algorithm: hash_file(weights, a))
            for algorithm in args.algorithms
        }
        checkpoints._remembered.clear()
        mark = timed(lambda: checkpoints.mark_complete(folder))
        checkpoints._remembered.clear()
        verify = timed(lambda: checkpoints.check_complete(folder))
        verify_cold = None
        if drop_from_page_cache([path for path in folder.iterdir() if path.is_file()]):
            checkpoints._remembered.clear()
            verify_cold = timed(lambda: checkpoints.check_complete(folder))
    return {
        "cpu": cpu_model(),
        "cpus": cpus(),
        "load_average_before": load,
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "torch": torch.__version__,
        "size": {"d_in": args.d_in, "d_sae": args.d_sae, "dtype": "float32"},
        "file_bytes": sizes,
        "write": write,
        "sha256": sha256,
        "reread": reread,
        "trainer_state_inline_hash": inline,
        "mark_complete": mark,
        "verify": verify,
        "verify_cold": verify_cold,
        "hash_on_weights": algorithms,
    }


def _both(timing: Timing) -> str:
    return f"{timing['wall']:.2f} s ({timing['cpu']:.2f} CPU s)"


def report(result: dict[str, Any]) -> None:
    gib = 2**30
    size, files = result["size"], result["file_bytes"]
    print(
        f"checkpoint files at d_in={size['d_in']}, d_sae={size['d_sae']} (float32) on "
        f"{result['cpu']}, {result['cpus']} CPUs (load average {result['load_average_before']:.1f}); "
        f"Python {result['python']}, {result['openssl']}"
    )
    print("seconds: wall / CPU")
    print(f"{'file':<24} {'GiB':>5} {'write':>13} {'sha256':>13} {'re-read':>13}")
    for name, size_bytes in files.items():
        cells = [result[measured][name] for measured in ("write", "sha256", "reread")]
        print(
            f"{name:<24} {size_bytes / gib:>5.2f} "
            + " ".join(f"{cell['wall']:>6.2f} /{cell['cpu']:>5.2f}" for cell in cells)
        )
    write = {
        key: sum(timing[key] for timing in result["write"].values()) for key in ("wall", "cpu")
    }
    mark = result["mark_complete"]
    print(
        f"writing both {_both(write)}; mark_complete, every file's sha256 in {result['cpus']} "
        f"threads, {_both(mark)}: +{100 * mark['wall'] / write['wall']:.0f}% wall, "
        f"+{100 * mark['cpu'] / write['cpu']:.0f}% CPU on the write"
    )
    print(
        f"trainer_state.pt: torch.save hashing as it writes {_both(result['trainer_state_inline_hash'])}"
        f"; write {_both(result['write']['trainer_state.pt'])} + sha256 afterwards "
        f"{_both(result['sha256']['trainer_state.pt'])}"
    )
    cold = result["verify_cold"]
    print(
        f"verify (check_complete, every file): {_both(result['verify'])} from the page cache, "
        f"{'not measured' if cold is None else _both(cold)} after dropping the files from it"
    )
    rates = ", ".join(
        f"{name} {files[FILES[0]] / gib / timing['cpu']:.2f}"
        for name, timing in result["hash_on_weights"].items()
        if timing["cpu"] > 0
    )
    print(f"GiB per CPU second on sae_weights.safetensors, one thread: {rates}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-in", type=int, default=2304)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp folder)")
    parser.add_argument("--algorithms", nargs="*", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    result = run(args)
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        report(result)


if __name__ == "__main__":
    main()
