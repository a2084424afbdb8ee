"""Tiny models for tests and the tiny configs (`tiny:` switches), built from configs in seconds: no
download. Runtime code imports these only when a config asks for a tiny model.

- `gendistill.testing.diffusion`: tiny SD, SD3, InstructPix2Pix and pixel-space pipelines, and
  `write_tiny_pipeline` (what `guidance.tiny` in an edit config writes);
- `gendistill.testing.video`: tiny CogVideoX pipeline and VideoMAE teacher (`model.tiny`).
"""
