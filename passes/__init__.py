"""Graph passes on onnx-ir models. Each pass is ``model, config -> model``; none knows about the CLI."""
