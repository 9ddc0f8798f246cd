"""The servable model, defined as code for MLflow ("models from code"): never imported by the package.

``servable.log_servable`` logs this file as the pyfunc model; where the model loads, MLflow runs it
with the package's code beside it, so nothing is unpickled.
"""

from mlflow.models import set_model

from rfcx_mlops.infer.servable import SpeciesScorer

set_model(SpeciesScorer())
