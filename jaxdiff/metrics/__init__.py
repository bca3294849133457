"""Judging samples.

    digits        a digit classifier fitted on the embedded MNIST digits, for the demos (do the
                  samples show the digits that were asked for?)
    stats         streaming, mergeable, sharded feature statistics (count, mean, scatter)
    distribution  FID (Frechet distance), KID, precision and recall, Inception Score
    reference     reference statistics files (.npz: mu, sigma, n, feature network id)
    clip_score    CLIP score of images against their captions (a local CLIPModel folder)
    likelihood    variational bounds in bits/dim: DDPM (discretised decoder) and VDM

FID from two feature sets, or against a reference file:

    from jaxdiff.metrics import distribution, reference, stats
    distribution.fid(stats.from_features(real), stats.from_features(fake))
    distribution.fid(reference.load_reference("ref.npz", feature_net=net_id), stats.from_features(fake))
"""

from jaxdiff.metrics import clip_score, distribution, likelihood, reference, stats  # noqa: F401
from jaxdiff.metrics.clip_score import ClipScore  # noqa: F401
from jaxdiff.metrics.distribution import (  # noqa: F401
    fid,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)
from jaxdiff.metrics.likelihood import Bound, ddpm_bound, vdm_bound  # noqa: F401
from jaxdiff.metrics.reference import Reference, load_reference, save_reference  # noqa: F401
from jaxdiff.metrics.stats import FeatureStats  # noqa: F401
