"""MLflow's entry point for the logged model ("models from code"): MLflow runs this file on load.

Not imported by mmops itself; `mmops.tracking.log_pyfunc` names it, so no pickled object is stored.
"""

import mlflow

from mmops.tracking import MmopsPyfunc

mlflow.models.set_model(MmopsPyfunc())
