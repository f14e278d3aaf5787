"""RAZN's claims (Dong et al., Table 1, BACH: mean IOU and relative inference time): RAZN
segments better than Scale 1, Scale 2, MS and Attention, and is faster than Scale 2 and
MS (relative to Scale 1's time; lower is better)."""
from h2g.evaluation.claims import Claim

MEAN_IOU = {"razn_scale1": 0.38, "razn_scale2": 0.39, "razn_ms": 0.18, "razn_attention": 0.36, "razn": 0.49}
TIME = {"razn_scale1": 1.00, "razn_scale2": 4.01, "razn_ms": 5.06, "razn_attention": 5.16, "razn": 2.71}

CLAIMS = (
    *(Claim("RAZN actually performs better than the single scale and the multi-scale baselines", "razn", d,
            "mean_iou", (MEAN_IOU["razn"], MEAN_IOU[d])) for d in ("razn_scale1", "razn_scale2", "razn_ms",
                                                                   "razn_attention")),
    *(Claim("an overall accuracy improvement at low inference time", "razn", d, "relative_time",
            (TIME["razn"], TIME[d]), lower_is_better=True) for d in ("razn_scale2", "razn_ms")),
)
