"""Train the digit feature network that ships as jaxdiff/metrics/assets/digit_features.safetensors.

    python experiments/train_digit_features.py                 # writes the asset, prints its sha256
    python experiments/train_digit_features.py --out /elsewhere/w.safetensors --steps 20

A `features.DigitNet` classifier on the 5,000 embedded digits at 16x16 (the demo's size), trained
on the 4,000 of `features.digit_split` with Adam and cross-entropy, each batch shifted by up to one pixel; the
held-out 1,000 give its accuracy. Everything is seeded (parameter init, batch order), so a rerun
on the same machine and jax version writes the same file bit for bit; after a rerun, update
DIGIT_WEIGHTS_SHA256 and DIGIT_HELDOUT_ACCURACY in jaxdiff/metrics/features.py.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import data
from jaxdiff.convert.tensors import write_safetensors
from jaxdiff.metrics import features

SEED = 0
BATCH = 100
STEPS = 800            # 20 epochs of the 4,000 training digits
LEARNING_RATE = 2e-3
SHIFT = 1              # augmentation: each batch moved by up to 1 pixel each way


def load_digits():
    """(train images, train labels, held-out images, held-out labels): [N, 16, 16, 1] in [-1, 1]."""
    examples, _ = data.load_examples("digits", image_size=16, channels=1)
    images, labels = examples["image"], examples["label"]
    train, held = features.digit_split(len(images))
    return images[train], labels[train], images[held], labels[held]


def batch_order(n: int, steps: int, seed: int = SEED) -> np.ndarray:
    """[steps, BATCH] example indices: a fresh seeded permutation per epoch."""
    rng = np.random.default_rng(seed)
    per_epoch = n // BATCH
    epochs = -(-steps // per_epoch)
    order = np.concatenate([rng.permutation(n)[:per_epoch * BATCH] for _ in range(epochs)])
    return order.reshape(-1, BATCH)[:steps]


def shift(x: np.ndarray, by) -> np.ndarray:
    """Move a batch [B, H, W, C] by (dy, dx) pixels, filling with the background (-1)."""
    dy, dx = (int(v) for v in by)
    out = np.full_like(x, -1.0)
    h, w = x.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def train(steps: int = STEPS, seed: int = SEED):
    """-> (params, per-step losses float32 [steps], held-out accuracy)."""
    x_train, y_train, x_held, y_held = load_digits()
    net = features.DigitNet()
    params = net.init(jax.random.key(seed), jnp.zeros((1, *features.DIGIT_IMAGE_SHAPE)))["params"]
    opt = optax.adam(LEARNING_RATE)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = net.apply({"params": p}, x)[1]                                 # [B, 10]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    shifts = np.random.default_rng(seed + 1)
    for idx in batch_order(len(x_train), steps, seed):
        x = shift(x_train[idx], shifts.integers(-SHIFT, SHIFT + 1, size=2))
        params, opt_state, loss = step(params, opt_state, x, y_train[idx])
        losses.append(float(loss))
    logits = jax.jit(lambda p, x: net.apply({"params": p}, x)[1])(params, x_held)
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == y_held))
    return params, np.asarray(losses, np.float32), accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=features.DIGIT_WEIGHTS)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    params, losses, accuracy = train(args.steps)
    # One metadata entry: safetensors writes a map of several in an order that varies per run,
    # which would change the file's bytes (and its sha256) from one run to the next.
    info = json.dumps({"format": "jaxdiff-digit-features", "steps": args.steps,
                       "heldout_accuracy": round(accuracy, 4)}, sort_keys=True)
    write_safetensors(features.flatten_params(params), args.out, {"jaxdiff": info})
    print(f"steps {args.steps}  final loss {losses[-1]:.4f}  held-out accuracy {accuracy:.4f}")
    print(f"wrote {args.out}  sha256 {features.file_sha256(args.out)}")


if __name__ == "__main__":
    main()
