"""Everything is in pyproject.toml but one build step: the top-level configs.toml (where a checkout keeps it, next to
run.py) is copied into the built package as seg/configs.toml, which seg/__init__.py finds first when installed. An
editable install (pip install -e .) runs seg/ from the checkout and so finds the checkout's file: nothing to copy."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConfigs(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file("configs.toml", os.path.join(self.build_lib, "seg", "configs.toml"))


setup(cmdclass={"build_py": BuildWithConfigs})
