//! Prints the CustomResourceDefinition YAML of every CRD (`cargo run -p memu-crds --bin crdgen`),
//! or with `--reference` the field reference Markdown generated from the same schema.
//! The committed copies (`crds/yaml/`, `docs/crd-reference.md`) are checked against this output
//! by the test script.

use kube::CustomResourceExt;
use memu_crds::cluster::MemUCluster;

fn main() {
    let crd = MemUCluster::crd();
    match std::env::args().nth(1).as_deref() {
        None => print!(
            "{}",
            serde_norway::to_string(&crd).expect("the CRD serialises")
        ),
        Some("--reference") => print!(
            "{}",
            memu_crds::reference::markdown(
                &serde_json::to_value(&crd).expect("the CRD serialises")
            )
        ),
        Some(other) => {
            eprintln!("usage: crdgen [--reference]; unknown argument {other}");
            std::process::exit(2);
        }
    }
}
