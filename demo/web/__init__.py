"""The browser sampler page (`ddpm_plugin.demo.web`): a static page that samples with onnxruntime-web."""
