"""H2G-Net's claims (Pedersen et al. 2022, Table 1: Dice on the test set; Section 4): every
deep-learning design beats Otsu's tissue mask, refinement beats the patch-wise heatmaps,
and the refined heatmap (Mob-PW-UNet) beats the low-resolution U-Net alone."""
from h2g.evaluation.claims import Claim

DICE = {"otsu": 0.669, "unet_lr": 0.874, "inc_pw": 0.887, "mob_pw": 0.885, "mob_km_pw": 0.872,
        "mob_pw_unet": 0.933, "mob_pw_agunet": 0.927, "mob_pw_dagunet": 0.928, "mob_pw_doubleunet": 0.929}


def _claim(text: str, better: str, worse: str) -> Claim:
    return Claim(text, better, worse, "dice", (DICE[better], DICE[worse]))


CLAIMS = (
    *(_claim("all deep learning-based methods outperformed the tissue segmentation method, Otsu", d, "otsu")
      for d in ("inc_pw", "mob_pw", "mob_km_pw")),
    *(_claim("a significant improvement when using a refinement network for post-processing the heatmaps", d,
             "mob_pw") for d in ("mob_pw_unet", "mob_pw_agunet", "mob_pw_dagunet", "mob_pw_doubleunet")),
    _claim("refinement improves on the best patch-wise classifier", "mob_pw_unet", "inc_pw"),
    _claim("the design outperformed cluster-guided patch-wise classification", "mob_pw_unet", "mob_km_pw"),
    _claim("the design outperformed a low-resolution U-Net", "mob_pw_unet", "unet_lr"),
)
