"""m-UNet's claims (multiclass-multistain-unet.txt, Results and Table 8): the master model
(m-UNet with EfficientNet-B4, two levels) improves on the base U-Net-B0 (mean IoU 0.44 on
validation), and each pseudo-label round improves on the one before ("the model learns
more varied distributions" with each step).  A round is ``munet_b4/round<k>`` (round 0 is
the base model), read from the design's ``rounds``."""
from h2g.evaluation.claims import Claim

CLAIMS = (
    Claim("the master model improves on the base model", "munet_b4", "unet_b0", "mean_iou", (None, 0.44)),
    Claim("each master round improves on the model it learned from", "munet_b4/round1", "munet_b4/round0",
          "mean_iou"),
    Claim("each master round improves on the model it learned from", "munet_b4/round2", "munet_b4/round1",
          "mean_iou"),
)
