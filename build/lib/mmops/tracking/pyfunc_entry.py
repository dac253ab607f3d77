"""MLflow's entry point for the logged model ("models from code"): MLflow runs this file on load.

Not imported by mmops itself; `mmops.tracking.pyfunc.log_pyfunc` names it: no pickled object.
"""

import mlflow

from mmops.tracking.pyfunc import MmopsPyfunc

mlflow.models.set_model(MmopsPyfunc())
