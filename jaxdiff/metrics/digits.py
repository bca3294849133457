"""A digit classifier for the digits demos: do the samples show the digits that were asked for?

    clf = digits.fit_classifier(images, labels)        # images [N, H, W, C] in [-1, 1]
    clf.heldout_accuracy                               # on the fifth of the images held out
    digits.accuracy(clf, samples, wanted)               # fraction of samples read as `wanted`
    clf = digits.reference_classifier(image_size=16)    # fitted on the embedded digits, cached

The classifier is a support-vector machine with an RBF kernel on the raw pixels (scikit-learn's
`SVC`), fitted on 4/5 of the real digits; on the embedded 28x28 MNIST digits it reads 95% of the
held-out fifth right at 16x16 and at 28x28, and fits in under a second at 16x16. It is a judge
of whether a sample *is* the digit asked for, not of image quality.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np


class DigitClassifier(NamedTuple):
    """model: the fitted scikit-learn classifier over flattened pixels; image_shape: (H, W, C) it
    reads; heldout_accuracy: its accuracy on the real digits it was not fitted on."""

    model: object
    image_shape: tuple[int, int, int]
    heldout_accuracy: float

    def predict(self, images) -> np.ndarray:
        """images [N, H, W, C] in [-1, 1] -> predicted digits int [N]."""
        images = np.asarray(images, np.float32)
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"the classifier reads images of shape {self.image_shape}, got {tuple(images.shape[1:])}")
        return self.model.predict(images.reshape(len(images), -1))


def fit_classifier(images, labels, seed: int = 0) -> DigitClassifier:
    """Fit on 4/5 of `images` [N, H, W, C] in [-1, 1] with `labels` [N]; the other fifth
    (a seeded permutation) gives `heldout_accuracy`."""
    from sklearn.svm import SVC

    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    x = images.reshape(len(images), -1)                                            # [N, H*W*C]
    order = np.random.default_rng(seed).permutation(len(x))
    cut = len(x) * 4 // 5
    train, test = order[:cut], order[cut:]
    model = SVC(C=5.0, gamma="scale")
    model.fit(x[train], labels[train])
    return DigitClassifier(model, tuple(images.shape[1:]), float(model.score(x[test], labels[test])))


def accuracy(classifier: DigitClassifier, images, wanted) -> float:
    """The fraction of `images` [N, H, W, C] in [-1, 1] that the classifier reads as `wanted` [N]."""
    return float(np.mean(classifier.predict(images) == np.asarray(wanted)))


@functools.lru_cache(maxsize=4)
def reference_classifier(image_size: int | None = None, channels: int = 1) -> DigitClassifier:
    """A classifier fitted on the embedded digits (`jaxdiff.data`'s "digits") at `image_size`
    (None: their native 28x28) with `channels` channels; cached per size."""
    from jaxdiff import data

    examples, _ = data.load_examples("digits", image_size=image_size, channels=channels)
    return fit_classifier(examples["image"], examples["label"])
