"""Run reports: charts and an HTML page built from the datasets a pipeline run wrote."""
