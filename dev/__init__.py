"""Repository tooling (the demo runner, a private Airflow for the tests): never part of the wheel."""
