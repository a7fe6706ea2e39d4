"""The exporters: the blocking calls that send our rows to one MLflow experiment.

`base` holds the `Exporter` protocol, the failures and what each means; `rest` (with `http`
and `rest_extras`) speaks to a tracking server, `mlflow_client` to every other store. Which
one a store gets is `rlm_mlflow._connect`'s. Nothing is imported here: importing the package
imports no exporter, and never mlflow.
"""
