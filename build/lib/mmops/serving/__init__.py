"""The one prediction path (`Predictor.predict_batch`), its runners and model references."""
