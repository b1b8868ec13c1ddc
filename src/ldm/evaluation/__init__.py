"""Evaluation: image features, FID / KID / CLIP score for generation, PSNR / SSIM / LPIPS / rFID for the
autoencoder, and the loops that run them over validation shards on one or several ranks."""
