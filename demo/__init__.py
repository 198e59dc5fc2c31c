"""The Gradio demo (`ddpm_plugin.demo`); `demo/app.py` also runs as a Hugging Face Space."""
