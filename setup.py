"""Maps the design card's top-level folders into the one `ddpm_plugin` namespace, with every sub-package found
by `find_packages`, so no module can be left out of the wheel (metadata is in pyproject.toml)."""

from setuptools import find_packages, setup

# import name -> folder in the repository
ROOTS = {
    "ddpm_plugin": "ddpm_plugin",
    "ddpm_plugin.pipelines": "pipelines",
    "ddpm_plugin.export": "export",
    "ddpm_plugin.demo": "demo",
}

package_dir = dict(ROOTS)
packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
