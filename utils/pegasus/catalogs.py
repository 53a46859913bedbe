"""The properties and the site catalog, translated from properties.conf, the flags and sites.yml.

The transformation and replica catalogs and the DAG are built in workflow.py, next to
the job table they come from.
"""

from __future__ import annotations

from pathlib import Path

from Pegasus.api import OS, Arch, Directory, FileServer, Namespace, Operation, Properties, Site, SiteCatalog

from .config import ConfigError, WorkflowConfig, enum_value


def build_properties(config: WorkflowConfig, catalog_files: dict[str, Path]) -> Properties:
    """properties.conf, then the flags; *catalog_files* maps site/transformation/replica to its file."""
    props = Properties()
    if config.properties_file is not None:
        try:
            props = Properties.load(config.properties_file)
        except FileNotFoundError:
            raise ConfigError(f"{config.properties_file}: properties file not found") from None
    for key, value in (("dagman.retry", config.retries), ("pegasus.mode", config.mode),
                       ("pegasus.transfer.threads", config.transfer_threads)):
        if value is not None:
            props[key] = value
    if config.execution_site == "local":
        # Jobs on the submit host read and write its file system directly.
        props["pegasus.data.configuration"] = "sharedfs"
    else:
        props["pegasus.data.configuration"] = config.execution_site_config().get("data_configuration", "condorio")
    # The catalogs are not in the planner's working directory: name them.
    for catalog, path in catalog_files.items():
        props[f"pegasus.catalog.{catalog}"] = "YAML"
        props[f"pegasus.catalog.{catalog}.file"] = str(path)
    for key, value in config.property_overrides.items():
        props[key] = value
    return props


def build_site_catalog(sites_config: dict, shared_scratch: Path, local_storage: Path) -> SiteCatalog:
    """"local" (the submit host: scratch and output folders) plus every site of sites.yml."""
    local_config = sites_config.get("local", {})
    local = Site(
        "local",
        arch=enum_value(Arch, local_config.get("arch", "x86_64"), "sites.yml local.arch"),
        os_type=enum_value(OS, local_config.get("os_type", "linux"), "sites.yml local.os_type"),
    ).add_directories(
        Directory(Directory.SHARED_SCRATCH, shared_scratch).add_file_servers(
            FileServer(shared_scratch.as_uri(), Operation.ALL)),
        Directory(Directory.LOCAL_STORAGE, local_storage).add_file_servers(
            FileServer(local_storage.as_uri(), Operation.ALL)),
    )
    sites = [local]
    for name, site_config in sites_config.get("sites", {}).items():
        site = Site(name, arch=enum_value(Arch, site_config.get("arch"), f"sites.yml sites.{name}.arch"),
                    os_type=enum_value(OS, site_config.get("os_type"), f"sites.yml sites.{name}.os_type"))
        site.add_pegasus_profile(style="condor")
        site.add_condor_profile(universe="vanilla")
        if site_config.get("data_configuration"):
            site.add_pegasus_profile(data_configuration=site_config["data_configuration"])
        for namespace, values in (site_config.get("profiles") or {}).items():
            for key, value in values.items():
                site.add_profiles(Namespace(namespace), key=str(key), value=value)
        sites.append(site)
    return SiteCatalog().add_sites(*sites)
