"""Benchmark fairclip's Matryoshka TopK SAE against a reference TopK SAE (``overcomplete``).

Both models get the same embeddings, width, k, batch size, optimiser (Adam), learning-rate
schedule and number of epochs; metrics are measured on a held-out split:

* FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2 at top-k (and, for ours, with all positive
  activations, the inference mode of MSAE),
* dead fraction = latents never in a top-k on the held-out split,
* mean cosine(x, x_hat), training samples/s (wall clock of the training loop only).

Without ``--embeddings`` it generates CLIP-like embeddings: a sparse non-negative code over a
power-law dictionary, plus a shared offset (CLIP's "cone") and Gaussian noise, L2-normalised.

Usage::

    python benchmarks/bench_sae.py                      # 50k x 512 synthetic, width 4096, k 32
    python benchmarks/bench_sae.py --embeddings emb.pt  # a saved (N, d) tensor
    python benchmarks/bench_sae.py --preset ViT-B-16    # MSAE's ViT-B/16 shape: 16384, (256, 512)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fairclip.sae import SAEConfig, lr_schedule, sae_metrics, train_sae
from fairclip.sae.presets import PRESETS


def clip_like_embeddings(
    n: int = 50_000,
    d: int = 512,
    n_atoms: int = 8192,
    mean_active: float = 16.0,
    offset: float = 1.0,
    noise: float = 0.3,
    seed: int = 0,
) -> torch.Tensor:
    """Sparse combination of dictionary atoms + shared offset + noise, L2-normalised rows.

    Atom frequencies follow a power law and coefficients are log-normal, so a few directions
    are common and most are rare, as in CLIP features. ``noise`` is the noise norm relative
    to the signal's (about 0.3: roughly 8% of the variance cannot be explained).
    """
    g = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
    freq = 1.0 / torch.arange(1, n_atoms + 1, dtype=torch.float64) ** 0.7
    freq = (freq / freq.sum() * mean_active).clamp(max=0.9)
    freq = freq.float()
    signal = torch.empty(n, d)
    for start in range(0, n, 2048):  # chunks keep the (rows, n_atoms) mask small
        stop = min(n, start + 2048)
        rows, cols = (torch.rand(stop - start, n_atoms, generator=g) < freq).nonzero(as_tuple=True)
        coef = torch.exp(0.5 * torch.randn(rows.numel(), generator=g))
        signal[start:stop] = torch.zeros(stop - start, d).index_add_(
            0, rows, coef[:, None] * atoms[cols]
        )
    signal = signal / signal.norm(dim=1, keepdim=True).clamp_min(1e-6)
    shared = F.normalize(torch.randn(d, generator=g), dim=0)
    x = signal + offset * shared + noise * torch.randn(n, d, generator=g) / math.sqrt(d)
    return F.normalize(x, dim=1)


def load_embeddings(path: str | None, n: int, d: int, seed: int) -> torch.Tensor:
    if path is None:
        return clip_like_embeddings(n=n, d=d, seed=seed)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        obj = obj.get("embeddings", next(iter(obj.values())))
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2:
        raise ValueError(f"--embeddings: expected a (N, d) tensor in {path}")
    return obj.float()


def run_ours(train: torch.Tensor, test: torch.Tensor, args, k_levels) -> dict:
    cfg = SAEConfig(
        d_in=train.shape[1],
        n_latents=args.width,
        k_levels=tuple(k_levels),
        level_weights=args.level_weights,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        dead_after=args.dead_after,
        seed=args.seed,
    )
    sae, hist = train_sae(train, cfg, progress=not args.quiet)
    m = sae_metrics(sae, test)
    return {
        "fvu_topk": m["fvu_topk"],
        "fvu_allpos": m["fvu"],
        "l0_allpos": m["l0"],
        "dead": m["dead_fraction"],
        "cos_topk": m["cos_topk"],
        "samples_per_s": hist["samples_per_s"],
        "steps": hist["steps"],
        "levels": {k: v for k, v in m.items() if k.startswith("fvu_k")},
    }


def _import_overcomplete():
    # overcomplete 0.3 imports plt.cm.get_cmap, removed in matplotlib 3.9.
    import matplotlib
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    from overcomplete.sae import TopKSAE
    from overcomplete.sae import train_sae as oc_train

    return TopKSAE, oc_train


def run_reference(train: torch.Tensor, test: torch.Tensor, args, center: bool) -> dict:
    TopKSAE, oc_train = _import_overcomplete()
    torch.manual_seed(args.seed)
    mean = train.mean(0) if center else torch.zeros(train.shape[1])
    scale = math.sqrt(train.shape[1] / (train - mean).square().sum(1).mean()) if center else 1.0
    tr, te = (train - mean) * scale, (test - mean) * scale
    model = TopKSAE(train.shape[1], nb_concepts=args.width, top_k=args.k, device="cpu")
    lr = args.lr if args.ref_lr is None else args.ref_lr
    try:  # the same (fused) Adam as ours
        opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(tr),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    cfg = SAEConfig(d_in=train.shape[1], n_latents=args.width, k_levels=(args.k,))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg, args.epochs * len(loader)))

    def mse(x, x_hat, *_):
        return (x - x_hat).square().mean()

    t0 = time.perf_counter()
    oc_train(model, loader, mse, opt, scheduler=sched, nb_epochs=args.epochs, monitoring=0)
    elapsed = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        sse, cos, fired = 0.0, 0.0, torch.zeros(args.width, dtype=torch.bool)
        for chunk in te.split(4096):
            _, z = model.encode(chunk)
            rec = model.decode(z)
            fired |= (z > 0).any(0)
            # metrics in the original embedding space
            x, r = chunk / scale + mean, rec / scale + mean
            sse += (x - r).square().sum().item()
            cos += F.cosine_similarity(x, r, dim=1).sum().item()
    total = (test - test.mean(0)).square().sum().item()
    return {
        "fvu_topk": sse / total,
        "dead": 1.0 - fired.float().mean().item(),
        "cos_topk": cos / test.shape[0],
        "samples_per_s": args.epochs * len(loader) * args.batch_size / elapsed,
        "steps": args.epochs * len(loader),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--embeddings", help="(N, d) tensor saved with torch.save; default: synthetic")
    p.add_argument("--n", type=int, default=50_000, help="synthetic rows")
    p.add_argument("--d", type=int, default=512, help="synthetic dimension")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--k", type=int, default=32, help="top-k of the reference = our largest level")
    p.add_argument("--levels", default="8,16,32", help="our nested levels (last must equal --k)")
    p.add_argument("--level-weights", default="uniform", choices=("uniform", "reverse"))
    p.add_argument(
        "--preset",
        help="an SAE preset of fairclip.sae.presets (e.g. ViT-B-16): sets --d, --width, --k, "
        "--levels and --level-weights",
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ref-lr", type=float, help="reference learning rate (default: --lr)")
    p.add_argument("--dead-after", type=int, default=100_000)
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("all", "ours", "reference"), default="all")
    p.add_argument("--json", help="also write results here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.preset:
        preset = PRESETS[args.preset]
        args.d, args.width, args.level_weights = preset.d_in, preset.n_latents, preset.level_weights
        args.k, args.levels = preset.k_levels[-1], ",".join(map(str, preset.k_levels))
    levels = [int(v) for v in args.levels.split(",")]
    if levels[-1] != args.k:
        p.error(f"--levels: the last level must equal --k={args.k}, got {levels}")
    if args.threads:
        torch.set_num_threads(args.threads)

    x = load_embeddings(args.embeddings, args.n, args.d, args.seed)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))
    n_test = max(1, int(args.holdout * x.shape[0]))
    test, train = x[perm[:n_test]], x[perm[n_test:]]
    print(
        f"data: {tuple(x.shape)} ({'synthetic CLIP-like' if args.embeddings is None else args.embeddings}),"
        f" train {train.shape[0]}, held-out {test.shape[0]}; width {args.width}, k {args.k},"
        f" epochs {args.epochs}, batch {args.batch_size}, lr {args.lr} (reference"
        f" {args.ref_lr or args.lr}), threads {torch.get_num_threads()}"
    )
    results = {}
    if args.only in ("all", "ours"):
        results[f"ours MSAE {tuple(levels)}"] = run_ours(train, test, args, levels)
        if len(levels) > 1:
            results[f"ours TopK ({args.k},)"] = run_ours(train, test, args, [args.k])
    if args.only in ("all", "reference"):
        results["overcomplete TopKSAE"] = run_reference(train, test, args, center=False)
        results["overcomplete TopKSAE, centred input"] = run_reference(
            train, test, args, center=True
        )

    head = f"{'model':40s} {'FVU@k':>8s} {'FVU all+':>9s} {'L0 all+':>8s} {'dead':>6s} {'cos@k':>7s} {'samples/s':>10s}"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        allpos = f"{r['fvu_allpos']:9.4f}" if "fvu_allpos" in r else f"{'-':>9s}"
        l0 = f"{r['l0_allpos']:8.1f}" if "l0_allpos" in r else f"{'-':>8s}"
        print(
            f"{name:40s} {r['fvu_topk']:8.4f} {allpos} {l0} {r['dead']:6.3f}"
            f" {r['cos_topk']:7.4f} {r['samples_per_s']:10.0f}"
        )
    for name, r in results.items():
        if "levels" in r:
            print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in r["levels"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
