"""ONNX export of the UNet and the onnxruntime sampling pipeline (`ddpm_plugin.export`)."""
