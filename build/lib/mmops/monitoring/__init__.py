"""Production monitoring: online drift tests per modality, calibrated to an ERT."""
