"""Ubuntu: the Debian backend with Ubuntu's archive, keyring and components.

Needs ``ubuntu-keyring`` on the host for the archive key. The Ubuntu archive is
not reachable from the machines this project is tested on: only the command
lines are tested here.
"""

from __future__ import annotations

import os

from bootstrap.distributions import Distribution
from bootstrap.distributions.debian import Debian
from bootstrap.run import MissingTool


class Ubuntu(Debian, distribution=Distribution.ubuntu):
    default_release = "noble"
    default_mirror = "http://archive.ubuntu.com/ubuntu"
    components = ("main", "universe")
    keyring = "/usr/share/keyrings/ubuntu-archive-keyring.gpg"

    @classmethod
    def check_tools(cls) -> dict[str, str]:
        found = super().check_tools()
        if cls.keyring and not os.path.exists(cls.keyring):
            raise MissingTool(
                f"ubuntu bootstrap needs {cls.keyring} (apt-get install ubuntu-keyring)"
            )
        return found
