"""TaskFlow decorators: ``@task.llmbatch``."""
