"""Running swarmnode as containers on a Docker engine, driven from Python (the Docker SDK).

- :mod:`.engine`: find the Docker engine, or install (Debian's ``docker.io``) and start one, and
  stop only an engine this process started;
- :mod:`.images`: build the three images of a site (``node``, ``ml``, ``chain``) from
  ``docker/``, offline: a base image from Debian's packages and a wheelhouse prepared on the host;
- :mod:`.consortium`: bring up a consortium of hospitals with the compose files in ``compose/``
  (one compose project per hospital, as each hospital runs it) and kill, pause, restart or cut off
  its containers for the tests and ``swarmnode demo --containers``.

These need a checkout of the repository (the Dockerfiles and compose files) and the ``demo``
extra (the Docker SDK).
"""
