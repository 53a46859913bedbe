"""The properties, the site catalog and the transformation catalog: from properties.conf, the flags,
sites.yml and the job table (JOB_SCRIPTS, RESOURCES) below.

The replica catalog and the DAG are built in workflow.py, from the data and the jobs it adds.
"""

from __future__ import annotations

from pathlib import Path

from Pegasus.api import (OS, Arch, Container, Directory, FileServer, Namespace, Operation, Properties, Site,
                         SiteCatalog, Transformation, TransformationCatalog, TransformationSite)

from .config import WorkflowConfig, enum_value, load_properties

# Job kind -> script. Every kind is one stageable transformation of the same name.
JOB_SCRIPTS = {
    "plot_class_distribution": "bin/plot_class_distribution.py",
    "preprocess": "bin/preprocess.py",
    "augment": "bin/augment.py",
    "hpo": "bin/hpo.py",
    "hpo_merge": "bin/hpo_merge.py",
    "train": "bin/train.py",
    "evaluate": "bin/evaluate.py",
    "predict": "bin/predict.py",
    "merge_predictions": "bin/merge_predictions.py",
    "predict_video": "bin/predict_video.py",
    "make_fold": "bin/make_fold.py",
    "aggregate_folds": "bin/aggregate_folds.py",
    "report": "bin/report.py",
}

# What each job kind asks of an execution node, in one place. Applied as pegasus profiles
# (cores, memory; HTCondor derives request_cpus and request_memory from them). "gpus" marks
# kinds that use a GPU when --gpus N > 0 asks for GPUs: those jobs then request N. The time
# limits (runtime; checkpoint.time and maxwalltime of hpo, train and predict, which on SIGTERM stop
# after a step, exit 143 and are retried from their checkpoint) come from each job's workload:
# utils/pegasus/runtimes.py (the formula, and the sites.yml overrides).
RESOURCES = {
    "plot_class_distribution": {"cores": 1, "memory": "1 GB", "gpus": 0},
    "preprocess": {"cores": 1, "memory": "2 GB", "gpus": 0},
    "augment": {"cores": 1, "memory": "2 GB", "gpus": 0},
    "hpo": {"cores": 4, "memory": "8 GB", "gpus": 1},
    "hpo_merge": {"cores": 1, "memory": "2 GB", "gpus": 0},
    "train": {"cores": 4, "memory": "8 GB", "gpus": 1},
    "evaluate": {"cores": 2, "memory": "4 GB", "gpus": 1},
    "predict": {"cores": 2, "memory": "4 GB", "gpus": 1},
    "merge_predictions": {"cores": 1, "memory": "4 GB", "gpus": 0},
    "predict_video": {"cores": 2, "memory": "4 GB", "gpus": 1},
    "make_fold": {"cores": 1, "memory": "2 GB", "gpus": 0},
    "aggregate_folds": {"cores": 1, "memory": "1 GB", "gpus": 0},
    "report": {"cores": 1, "memory": "2 GB", "gpus": 0},
}

CONTAINER_TYPES = {"singularity": Container.SINGULARITY, "docker": Container.DOCKER}
CONTAINER_NAME = "mask-detection"



def build_properties(config: WorkflowConfig, catalog_files: dict[str, Path]) -> Properties:
    """properties.conf, then the flags; *catalog_files* maps site/transformation/replica to its file."""
    props = Properties() if config.properties_file is None else load_properties(config.properties_file)
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


def build_site_catalog(sites_config: dict, shared_scratch: Path, local_storage: Path,
                       sites_file: str = "sites.yml") -> SiteCatalog:
    """"local" (the submit host: scratch and output folders) plus every site of sites.yml (*sites_file*, which
    load_sites_config checked)."""
    local_config = sites_config.get("local", {})
    local = Site(
        "local",
        arch=enum_value(Arch, local_config.get("arch", "x86_64"), f"{sites_file}: local.arch"),
        os_type=enum_value(OS, local_config.get("os_type", "linux"), f"{sites_file}: local.os_type"),
    ).add_directories(
        Directory(Directory.SHARED_SCRATCH, shared_scratch).add_file_servers(
            FileServer(shared_scratch.as_uri(), Operation.ALL)),
        Directory(Directory.LOCAL_STORAGE, local_storage).add_file_servers(
            FileServer(local_storage.as_uri(), Operation.ALL)),
    )
    sites = [local]
    for name, site_config in sites_config.get("sites", {}).items():
        site = Site(name, arch=enum_value(Arch, site_config.get("arch"), f"{sites_file}: sites.{name}.arch"),
                    os_type=enum_value(OS, site_config.get("os_type"), f"{sites_file}: sites.{name}.os_type"))
        site.add_pegasus_profile(style="condor")
        site.add_condor_profile(universe="vanilla")
        if site_config.get("data_configuration"):
            site.add_pegasus_profile(data_configuration=site_config["data_configuration"])
        for namespace, values in (site_config.get("profiles") or {}).items():
            for key, value in values.items():
                site.add_profiles(Namespace(namespace), key=str(key), value=value)
        sites.append(site)
    return SiteCatalog().add_sites(*sites)


def build_transformation_catalog(config, runtimes: dict) -> tuple[TransformationCatalog, dict[str, Transformation]]:
    """One container (unless --container-type none) and one transformation per job kind, with its resources
    and its runtime (*runtimes*: utils/pegasus/runtimes.py). Returns the catalog and kind -> transformation."""
    tc, transformations = TransformationCatalog(), {}
    container = None
    if config.container_type != "none":
        container = Container(CONTAINER_NAME, CONTAINER_TYPES[config.container_type],
                              image=config.container_image)
        tc.add_containers(container)
    # Staged scripts import `utils` from the image (PYTHONPATH=/app). Without a container they are installed,
    # run in place from the project folder as each site sees it, that folder on PYTHONPATH: a staged script
    # would land in a scratch folder with no `utils` beside it. ("local": the submit host, for Shell runs.)
    installed = {config.execution_site: config.software_dir(), "local": config.project_root.resolve()}
    for kind, script in JOB_SCRIPTS.items():
        resources = RESOURCES[kind]
        transformation = (Transformation(kind, site="local", pfn=(config.project_root / script).resolve(),
                                         is_stageable=True, container=container) if container is not None else
                          Transformation(kind).add_sites(*(TransformationSite(site, str(folder / script))
                                                           .add_env(PYTHONPATH=str(folder))
                                                           for site, folder in installed.items())))
        transformation.add_pegasus_profile(cores=resources["cores"], memory=resources["memory"],
                                           runtime=str(runtimes[kind]))
        transformations[kind] = transformation
        tc.add_transformations(transformation)
    return tc, transformations
