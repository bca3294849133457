"""Reference statistics of a dataset for `jaxdiff eval --ref`: stream every image through a feature
network and save (mu, sigma, n, the network's identity) as a checked `.npz`.

    # CIFAR-10 train set, FID Inception-v3 (the weights file you converted, see README: Evaluation)
    python experiments/make_reference.py --dataset tfds:cifar10 --inception pt_inception.safetensors \
        --out cifar10_train_inception.npz
    # the embedded digits at 16x16 with the shipped digit network (offline, seconds)
    python experiments/make_reference.py --dataset digits --out digits_all.npz

Then, for the DDPM CIFAR-10 recipe (experiments/cifar10_ddpm.py; Ho et al. 2020 report FID 3.17
with 50,000 samples of the 800k-step EMA model, against the training set):

    jaxdiff eval --checkpoint runs/cifar10 --inception pt_inception.safetensors \
        --ref cifar10_train_inception.npz --num 50000 --seeds 3 --sampler ddpm --steps 1000

That run needs an accelerator: 800k training steps of a 35.7M-parameter U-Net and 150,000
thousand-step samples are weeks on this project's 2-core CPU.
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm.auto import tqdm

from jaxdiff.data import catalog
from jaxdiff.metrics import features, reference, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="digits | tfds:NAME[:SPLIT] | folder:PATH")
    parser.add_argument("--split", default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--image_size", type=int, default=None,
                        help="resize to N x N first (default: the digits at 16, others native)")
    parser.add_argument("--inception", default=None, help="FID Inception-v3 weights (safetensors); "
                        "default: the shipped digit network (16x16x1 images)")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    digit_net = args.inception is None
    size = args.image_size or (16 if digit_net else None)
    source = catalog.open_source(args.dataset, image_size=size, channels=1 if digit_net else None, split=args.split,
                                 data_dir=args.data_dir, image_key="image", label_key="label")
    if digit_net:
        fn, dim, name = features.digit_features, features.DIGIT_FEATURE_DIM, features.DIGIT_FEATURE_NET
    else:
        fn, dim = (lambda x: features.inception_features(x, args.inception)), 2048
        name = features.inception_feature_net(args.inception)
    s = stats.init(dim)
    for start in tqdm(range(0, source.num_examples, args.batch_size), desc="features", unit="batch"):
        images, _ = source.load(np.arange(start, min(start + args.batch_size, source.num_examples)))
        s = stats.update(s, fn(images))
    reference.save_reference(args.out, s, feature_net=name)
    print(f"wrote {args.out}: {s.n} images, {dim}-d features of {name.split(':')[0]}")


if __name__ == "__main__":
    main()
