"""The service layer: a trained model behind HTTP (FastAPI), on top of detection/."""
