//! Data-parallel training over several processes, on torch.distributed's own engine (libtorch's
//! c10d: NCCL on CUDA, Gloo on CPU), launched by torchrun or Slurm's srun without wrappers.
//!
//! - [`Launch`]: who this process is, from the launcher's environment.
//! - [`World`]: the ranks training together (one, with no process group, when not launched so).
//! - `process_group`: the c10d process group (`c10d.cpp`).
//! - `zero`: AdamW with its state sharded over the ranks (ZeRO-1), over `flight` (collectives
//!   in flight within a window).

mod flight;
pub mod process_group;
pub mod zero;

use anyhow::{bail, Context, Result};
use std::time::Duration;
use crate::flags::DeviceChoice;
use tch::{Device, Kind, Tensor};

use process_group::ProcessGroup;

/// Where this process sits in a multi-process launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// The rank on this node: which GPU it takes.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// torchrun's default rendezvous port.
const DEFAULT_PORT: u16 = 29500;

impl Launch {
    /// From the environment: torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`, else Slurm's `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` and the first
    /// host of `SLURM_JOB_NODELIST` (`MASTER_ADDR`/`MASTER_PORT` win when set). `None` without a
    /// launcher. torchrun's world of one is a launch (a process group of one: how NCCL is checked
    /// on a single GPU); a Slurm job's single task is not, so `magpie` in a one-task batch script
    /// trains as it does anywhere else.
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name).map(|v| v.trim().parse::<usize>().with_context(|| format!("{name}={v}: not a number"))).transpose()
        };
        let (rank, world, local_rank, host) = if let Some(world) = number("WORLD_SIZE")? {
            let rank = number("RANK")?.context("WORLD_SIZE is set but RANK is not (launch with torchrun)")?;
            (rank, world, number("LOCAL_RANK")?.unwrap_or(rank), var("MASTER_ADDR"))
        } else if let Some(world) = number("SLURM_NTASKS")?.filter(|&n| n > 1) {
            let rank = number("SLURM_PROCID")?.context("SLURM_NTASKS is set but SLURM_PROCID is not (launch with srun)")?;
            let host = var("MASTER_ADDR").or_else(|| var("SLURM_JOB_NODELIST").map(|list| first_host(&list)));
            (rank, world, number("SLURM_LOCALID")?.unwrap_or(0), host)
        } else {
            return Ok(None);
        };
        if world == 0 {
            bail!("WORLD_SIZE=0: expected at least 1");
        }
        if rank >= world {
            bail!("rank {rank} is not below the world size {world}");
        }
        let master_port = match var("MASTER_PORT") {
            Some(port) => port.trim().parse().with_context(|| format!("MASTER_PORT={port}: not a port"))?,
            None => DEFAULT_PORT,
        };
        let master_addr = host.context("no rendezvous host: set MASTER_ADDR")?;
        Ok(Some(Launch { rank, world, local_rank, master_addr, master_port }))
    }
}

/// The first host of a Slurm node list: `gpu[03-05,9],cpu1` gives `gpu03`.
pub fn first_host(list: &str) -> String {
    let first = match (list.find('['), list.find(',')) {
        (Some(open), Some(comma)) if comma < open => &list[..comma],
        (Some(open), _) => {
            let range = &list[open + 1..];
            let end = range.find([',', '-', ']']).unwrap_or(range.len());
            return format!("{}{}", &list[..open], &range[..end]);
        }
        (None, Some(comma)) => &list[..comma],
        (None, None) => list,
    };
    first.to_string()
}

/// The processes training together.
pub struct World {
    pub rank: usize,
    pub size: usize,
    group: Option<ProcessGroup>,
}

/// The GPU index of the process with `local_rank` on its node when it sees `visible` GPUs: its
/// local rank where every process sees all of the node's GPUs (torchrun, `--gpus-per-node`), and
/// modulo what it sees where Slurm binds one GPU per task (`--gpus-per-task=1`: always 0).
pub fn local_gpu(local_rank: usize, visible: usize) -> usize {
    if visible == 0 { local_rank } else { local_rank % visible }
}

impl World {
    /// One process, no process group: training exactly as without a launcher.
    pub fn single() -> World {
        World { rank: 0, size: 1, group: None }
    }

    /// From the launcher's environment, on `device` (`auto` or `cuda` under a launcher take the
    /// GPU of this process's local rank). Returns the world and the device to train on.
    pub fn from_env(device: DeviceChoice, timeout: Duration) -> Result<(World, Device)> {
        let Some(launch) = Launch::from_env()? else {
            return Ok((World::single(), device.resolve(None)?));
        };
        let device = device.resolve(Some(local_gpu(launch.local_rank, tch::Cuda::device_count().max(0) as usize)))?;
        let group = ProcessGroup::join(&launch.master_addr, launch.master_port, launch.rank, launch.world, device, timeout)?;
        eprintln!("magpie: rank {} of {} on {device:?} ({} at {}:{})", launch.rank, launch.world,
                  if device.is_cuda() { "NCCL" } else { "Gloo" }, launch.master_addr, launch.master_port);
        Ok((World { rank: launch.rank, size: launch.world, group: Some(group) }, device))
    }

    /// Rank 0, which writes the run's folder, logs and the final model.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    pub fn group(&self) -> Option<&ProcessGroup> {
        self.group.as_ref()
    }

    pub fn barrier(&self) -> Result<()> {
        self.group.as_ref().map_or(Ok(()), ProcessGroup::barrier)
    }

    /// Sums 0-dim values over the ranks in one all-reduce; a single process returns them as they are.
    pub fn sum_scalars(&self, values: &[Tensor]) -> Result<Vec<Tensor>> {
        let Some(group) = &self.group else { return Ok(values.iter().map(Tensor::shallow_clone).collect()) };
        let stacked = Tensor::stack(&values.iter().map(|v| v.to_kind(Kind::Double).to_device(group.device)).collect::<Vec<_>>(), 0);
        group.all_reduce_sum(&stacked)?;
        Ok((0..values.len() as i64).map(|i| stacked.get(i)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn the_local_gpu_is_the_local_rank_modulo_the_gpus_this_process_sees() {
        assert_eq!(local_gpu(3, 1), 0, "Slurm --gpus-per-task=1: each task sees only its own GPU");
        assert_eq!(local_gpu(3, 8), 3);
        assert_eq!(local_gpu(9, 8), 1);
    }

    #[test]
    fn torchrun_and_slurm_environments_name_the_rank_and_the_rendezvous() {
        assert_eq!(launch(&[]).unwrap(), None);
        assert_eq!(launch(&[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")]).unwrap(), None, "a one-task Slurm job is no launch");
        let one = launch(&[("WORLD_SIZE", "1"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1")]).unwrap();
        assert_eq!(one.map(|l| l.world), Some(1), "torchrun's world of one is: a process group of one");
        let torchrun = launch(&[("WORLD_SIZE", "8"), ("RANK", "5"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "node3"), ("MASTER_PORT", "29400")]).unwrap();
        assert_eq!(torchrun, Some(Launch { rank: 5, world: 8, local_rank: 1, master_addr: "node3".into(), master_port: 29400 }));
        let slurm = launch(&[("SLURM_NTASKS", "16"), ("SLURM_PROCID", "9"), ("SLURM_LOCALID", "1"), ("SLURM_JOB_NODELIST", "gpu[07-08,12]")]).unwrap();
        assert_eq!(slurm, Some(Launch { rank: 9, world: 16, local_rank: 1, master_addr: "gpu07".into(), master_port: 29500 }));
        let err = launch(&[("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(err.contains("RANK is not"), "{err}");
        let err = launch(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h")]).unwrap_err().to_string();
        assert!(err.contains("not below"), "{err}");
        let err = launch(&[("WORLD_SIZE", "2"), ("RANK", "1")]).unwrap_err().to_string();
        assert!(err.contains("MASTER_ADDR"), "{err}");
    }

    #[test]
    fn the_first_host_of_a_slurm_node_list() {
        assert_eq!(first_host("node1"), "node1");
        assert_eq!(first_host("a1,b2"), "a1");
        assert_eq!(first_host("gpu[03-05,9],cpu1"), "gpu03");
        assert_eq!(first_host("cpu1,gpu[03-05]"), "cpu1");
        assert_eq!(first_host("n[7]"), "n7");
    }
}
