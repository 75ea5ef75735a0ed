"""QuEST (Wang et al. 2024): selective fine-tuning and the time-aware activation quantizer.

Modules: `settings` (the fine-tuning section of a recipe), `finetune` (the stages: time
embedding, then attention, distilled on the model's eps), `time_aware` (activation scales per
timestep bucket: buckets, per-bucket calibration tables, the fake-quant model that switches
scales by the UNet call's timestep). W4A4, QuEST's headline setting, is the `w4a4` preset of
`calib.recipe` (fake-quant only).
"""
