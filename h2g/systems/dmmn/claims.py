"""DMMN's claims (Ho et al., Table I, the TNBC test images: IOU per class and mean):
DMMN-M3 beats the single-magnification DSMN-S2 and the other multi-magnification
architectures, on the mean IoU and on the classes the paper singles out (carcinoma and
benign epithelium, "known to be challenging")."""
from h2g.evaluation.claims import Claim

MEAN_IOU = {"dsmn_s2": 0.894, "dmmn_ms": 0.898, "dmmn_m2s": 0.914, "dmmn_m3": 0.937}
CARCINOMA = {"dsmn_s2": 0.869, "dmmn_ms": 0.895, "dmmn_m2s": 0.899, "dmmn_m3": 0.927}
BENIGN = {"dsmn_s2": 0.841, "dmmn_ms": 0.777, "dmmn_m2s": 0.864, "dmmn_m3": 0.916}
OURS = "our proposed architecture (DMMN-M3) outperforms other architectures"

CLAIMS = (
    *(Claim(OURS, "dmmn_m3", d, "mean_iou", (MEAN_IOU["dmmn_m3"], MEAN_IOU[d])) for d in ("dsmn_s2", "dmmn_ms",
                                                                                         "dmmn_m2s")),
    *(Claim("the highest IOU for carcinoma", "dmmn_m3", d, "iou:tumour", (CARCINOMA["dmmn_m3"], CARCINOMA[d]))
      for d in ("dsmn_s2", "dmmn_ms", "dmmn_m2s")),
    *(Claim("the highest IOU for benign epithelial", "dmmn_m3", d, "iou:benign", (BENIGN["dmmn_m3"], BENIGN[d]))
      for d in ("dsmn_s2", "dmmn_ms", "dmmn_m2s")),
)
