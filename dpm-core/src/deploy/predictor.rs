//! [`Predictor`]: runs a Caffe2-style predict net on the CPU, its parameters
//! from an init net or a checkpoint.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::error::{Error, Result};
use crate::exec::Workspace;
use crate::graph::Device;
use crate::proto::{NetDef, Wire};
use crate::tensor::Tensor;

/// Runs a Caffe2-style predictor: an init net (or a checkpoint) for the
/// parameters, a predict net for each batch, on the CPU.
///
/// ```no_run
/// # use dpm_core::deploy::Predictor;
/// # use dpm_core::tensor::Tensor;
/// let p = Predictor::load("model/init_net.pb", "model/predict_net.pb")?;
/// let scores = p.run(&[("data", Tensor::zeros::<f32>([1, 3, 32, 32]))])?;
/// # Ok::<(), dpm_core::Error>(())
/// ```
pub struct Predictor {
    ws: Workspace,
    net: NetDef,
}

impl Predictor {
    /// Runs `init` once and compiles `predict`.
    pub fn new(init: &NetDef, predict: &NetDef) -> Result<Predictor> {
        let ws = Workspace::new();
        ws.run_net_once(&on_host(init))?;
        Self::with_workspace(ws, predict)
    }

    /// [`Predictor::new`] from `init_net.pb` and `predict_net.pb` files.
    pub fn load(init: impl AsRef<Path>, predict: impl AsRef<Path>) -> Result<Predictor> {
        Self::new(&read_net(init.as_ref())?, &read_net(predict.as_ref())?)
    }

    /// `predict` with its parameters from a checkpoint (Trainer::save's file):
    /// parameters only, by their names without a device prefix; the training
    /// state in it (`ITER`, momenta) is neither needed nor used. A parameter the
    /// net reads that the checkpoint lacks is an error naming it.
    pub fn from_checkpoint(predict: &NetDef, checkpoint: impl AsRef<Path>) -> Result<Predictor> {
        let ck = crate::checkpoint::load(checkpoint.as_ref())?;
        let by_name: HashMap<&str, &Tensor> = ck.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let ws = Workspace::new();
        let mut missing = Vec::new();
        for i in &predict.external_input {
            match by_name.get(i.as_str()) {
                Some(t) => ws.feed(i, (*t).clone()),
                None => missing.push(i.clone()),
            }
        }
        // What the checkpoint lacks must be what the caller feeds: the first
        // external inputs (Caffe2 lists inputs before parameters).
        let fed = predict
            .external_input
            .iter()
            .take_while(|i| !by_name.contains_key(i.as_str()));
        let fed: HashSet<&String> = fed.collect();
        if let Some(m) = missing.iter().find(|m| !fed.contains(m)) {
            return Err(Error::Checkpoint {
                path: checkpoint.as_ref().display().to_string(),
                reason: format!("no tensor `{m}`, which the predict net reads"),
            });
        }
        Self::with_workspace(ws, predict)
    }

    fn with_workspace(ws: Workspace, predict: &NetDef) -> Result<Predictor> {
        let net = on_host(predict);
        ws.create_net(&net)?;
        Ok(Predictor { ws, net })
    }

    /// The workspace holding the parameters and, after a run, every blob the
    /// predict net wrote.
    pub fn workspace(&self) -> &Workspace {
        &self.ws
    }

    /// The predict net, as it runs (on the CPU).
    pub fn net(&self) -> &NetDef {
        &self.net
    }

    /// Feeds `inputs`, runs the predict net, and returns its external outputs.
    pub fn run(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>> {
        for (name, t) in inputs {
            self.ws.feed(name, t.clone());
        }
        self.ws.run_net(self.net.net_name())?;
        self.net
            .external_output
            .iter()
            .map(|o| Ok((o.clone(), self.ws.fetch(o)?)))
            .collect()
    }
}

/// The net with every op on the host (a predictor runs on the CPU).
fn on_host(net: &NetDef) -> NetDef {
    let mut net = net.clone();
    net.device_option = None;
    for op in &mut net.op {
        op.device_option = Some(Device::cpu(0).to_proto());
    }
    net
}

fn read_net(path: &Path) -> Result<NetDef> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    NetDef::from_bytes(&bytes).map_err(|e| Error::InvalidNet {
        net: path.display().to_string(),
        reason: format!("not a NetDef: {e}"),
    })
}
