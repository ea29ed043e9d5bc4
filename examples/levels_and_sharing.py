"""Use every level of a Matryoshka SAE, export it, and share it on the Hub.

Offline by default: trains a small Matryoshka SAE on the hierarchical toy model,
then shows level-aware inference (encode/decode at a width, ``truncate``,
every level at once), writes a portable plain-SAELens copy, and prints the
model card an upload would carry. With ``--repo-id`` (and Hub access and a
token) it uploads for real; ``SAE.from_pretrained(repo_id, "toy")`` then
returns the MatryoshkaSAE.

    python examples/levels_and_sharing.py --output-dir matryoshka_shared
    python examples/levels_and_sharing.py --repo-id you/matryoshka-toy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sae_lens import SAE

from sae_lens_matryoshka import (
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
    export_portable,
    to_inference,
    upload_to_huggingface,
)
from sae_lens_matryoshka.io.hub import hub_errors_in_one_line, model_card
from sae_lens_matryoshka.toy import ToyHierarchy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=Path("matryoshka_shared"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repo-id", default=None, help="upload to this Hub repository")
    args = parser.parse_args()

    toy = ToyHierarchy(seed=0)
    n = toy.n_features
    torch.manual_seed(0)
    trained = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=n, d_sae=2 * n, k=toy.expected_l0, matryoshka_widths=[6, 16, 2 * n]
        )
    )
    toy.train(trained, args.steps)
    sae = to_inference(trained)  # what the runner would have saved

    _, x = toy.sample(4096)
    with torch.no_grad():
        acts = sae.encode(x)
        levels = sae.decode_levels(acts)
        variance = (x - x.mean(0)).pow(2).sum(-1).mean()
        print(f"{'level':>6} {'var. explained':>15} {'L0':>6}")
        for width, recon in zip(sae.matryoshka_widths, levels, strict=True):
            explained = 1 - (recon - x).pow(2).sum(-1).mean() / variance
            l0 = (sae.encode(x, width=width) > 0).float().sum(-1).mean()
            print(f"{width:>6} {explained.item():>15.3f} {l0.item():>6.2f}")
        first = sae.truncate(sae.matryoshka_widths[0])
        assert torch.allclose(first(x), sae.decode(acts, width=first.cfg.d_sae), atol=1e-5)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    sae.save_model(args.output_dir / "matryoshka")
    portable = export_portable(sae, args.output_dir / "portable")
    print(
        f"saved {args.output_dir / 'matryoshka'} and a plugin-free copy: {type(SAE.load_from_disk(portable)).__name__}"
    )

    if args.repo_id is None:
        print(model_card("you/matryoshka-toy", {"toy": sae.cfg.to_dict()}, {}))
    else:
        with hub_errors_in_one_line():
            upload_to_huggingface({"toy": sae}, args.repo_id)
        print(f"uploaded; load with SAE.from_pretrained({args.repo_id!r}, 'toy')")


if __name__ == "__main__":
    main()
