"""The `vision-bridge` command line: the application on top of the library (`bridgecore`) and the
orchestration (`flows`, `tasks`). It lives outside `bridgecore` so that the library never calls into
Prefect or the flows."""
