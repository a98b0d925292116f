//! Prints the CustomResourceDefinition YAML of every CRD (`cargo run -p memu-crds --bin crdgen`).
//! The committed copy in `crds/yaml/` is checked against this output by the test script.

use kube::CustomResourceExt;
use memu_crds::cluster::MemUCluster;

fn main() {
    print!(
        "{}",
        serde_norway::to_string(&MemUCluster::crd()).expect("the CRD serialises")
    );
}
