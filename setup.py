"""Everything is in pyproject.toml but one file: ``ironcore-lm-eval.pth``, which lets the ``lm_eval`` command find
IronCore's model (``ironcore_lm_eval.py``). A .pth file must sit in site-packages itself, which
pyproject.toml cannot say: here it goes beside the packages of the wheel, and of an editable install's wheel
(setuptools >= 64; ``tests/test_lm_eval_adapter.py`` runs the ``lm_eval`` command to check it is there)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).parent / "ironcore-lm-eval.pth"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH.name)]


class EditableWithPth(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):  # noqa: ANN001, ANN202
        files, mapping = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copy(PTH, Path(unpacked_wheel) / PTH.name)  # the wheel's root: site-packages
        return files, mapping


setup(cmdclass={"build_py": BuildWithPth, "editable_wheel": EditableWithPth})
