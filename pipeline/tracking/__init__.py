"""MLflow tracking, the model registry with gated champion promotion, and served / batch recommendations.

* :mod:`~pipeline.tracking.store`: tracking URI (``$MLFLOW_TRACKING_URI`` or the embedded SQLite store), retries;
* :mod:`~pipeline.tracking.runs`: the run each model is logged on, carried between stages in pointer files;
* :mod:`~pipeline.tracking.train_stage`, :mod:`~pipeline.tracking.evaluate_stage`: those stages with their run;
* :mod:`~pipeline.tracking.promotion`: ``register(params)``: the gate that decides whether a model becomes ``champion``;
* :mod:`~pipeline.tracking.registry`: registry calls: version + aliases as one unit, recovery, the champion's files;
* :mod:`~pipeline.tracking.packaging`: the pyfunc as logged (code, artifacts, signature, requirements);
* :mod:`~pipeline.tracking.pyfunc_model`: the pyfunc, logged as code (no pickles);
* :mod:`~pipeline.tracking.recommender`: raw-id top-K from a trained model (serving and batch);
* :mod:`~pipeline.tracking.batch`: ``recommend_batch(params)``: the top-K of every user to Parquet.

Nothing is imported here, so importing the package (an Airflow DAG file, ``train`` with tracking off) stays cheap.
"""
