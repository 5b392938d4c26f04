"""Ingestion of fresh interaction logs: inbox -> validation -> date-partitioned store, and a replay of real data.

One module per step, each a plain function shared by ``python -m pipeline ingest`` and the Airflow DAG
(``dags/retrain.py``): :mod:`.inbox` collects the log files of a data interval, :mod:`.validate` checks them with the
same readers and quarantine as the download stage, :mod:`.store` merges them into the interaction store,
:mod:`.retrain` ties the steps to a data interval, and :mod:`.replay` turns a dataset with real timestamps into a
store plus dated log files.
"""
