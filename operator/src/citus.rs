//! Citus membership: the coordinator's `pg_dist_node` is kept equal to the worker StatefulSets
//! the spec asks for. A one-shot init script races the workers' start-up and silently loses
//! nodes; comparing and converging on every reconcile does not.
//!
//! The plan is a pure function (unit-tested); `sync` runs it against the coordinator.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Row};

/// A Citus worker as `pg_dist_node` names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    pub host: String,
    pub port: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Add(Node),
    Remove(Node),
}

/// What to do so that the registered workers equal the desired ones. Additions come first so a
/// cluster never loses capacity while converging; additions never rebalance shards.
pub fn plan(registered: &[Node], desired: &[Node]) -> Vec<Change> {
    let registered: BTreeSet<_> = registered.iter().cloned().collect();
    let desired: BTreeSet<_> = desired.iter().cloned().collect();
    desired
        .difference(&registered)
        .cloned()
        .map(Change::Add)
        .chain(registered.difference(&desired).cloned().map(Change::Remove))
        .collect()
}

/// How to reach the coordinator (credentials come from the generated Secret).
pub struct Coordinator {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CitusError {
    #[error("coordinator unreachable: {0}")]
    Unreachable(String),
    #[error("citus: {0}")]
    Sql(String),
}

impl From<sqlx::Error> for CitusError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => {
                Self::Unreachable(e.to_string())
            }
            // Database errors carry Citus's own message (e.g. a node that still holds shards).
            other => Self::Sql(other.to_string()),
        }
    }
}

/// The outcome of one membership pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    pub registered: usize,
    pub desired: usize,
    pub applied: Vec<Change>,
}

/// Converges `pg_dist_node` on `desired` and, when `rebalance` is set, starts a background
/// shard rebalance (only ever on explicit request).
pub async fn sync(
    coordinator: &Coordinator,
    desired: &[Node],
    rebalance: bool,
) -> Result<Membership, CitusError> {
    let options = PgConnectOptions::new()
        .host(&coordinator.host)
        .port(coordinator.port)
        .username(&coordinator.user)
        .password(&coordinator.password)
        .database(&coordinator.database)
        .disable_statement_logging();
    let mut conn = tokio::time::timeout(Duration::from_secs(5), options.connect())
        .await
        .map_err(|_| CitusError::Unreachable("connect timed out after 5 s".into()))??;
    // Workers authenticate the coordinator with the same generated password (nodeid 0 = all).
    sqlx::query(
        "INSERT INTO pg_dist_authinfo (nodeid, rolename, authinfo) \
         VALUES (0, $1, 'password=' || $2) ON CONFLICT DO NOTHING",
    )
    .bind(&coordinator.user)
    .bind(&coordinator.password)
    .execute(&mut conn)
    .await?;
    let registered: Vec<Node> = sqlx::query(
        "SELECT nodename, nodeport FROM pg_dist_node WHERE groupid <> 0 AND noderole = 'primary'",
    )
    .fetch_all(&mut conn)
    .await?
    .into_iter()
    .map(|r| Node {
        host: r.get(0),
        port: r.get(1),
    })
    .collect();
    let changes = plan(&registered, desired);
    let mut applied = Vec::new();
    for change in changes {
        match &change {
            Change::Add(n) => {
                sqlx::query("SELECT citus_add_node($1, $2)")
                    .bind(&n.host)
                    .bind(n.port)
                    .execute(&mut conn)
                    .await?;
            }
            // Fails, with Citus's reason, while the node still holds shard placements: data is
            // never dropped by a membership change.
            Change::Remove(n) => {
                sqlx::query("SELECT citus_remove_node($1, $2)")
                    .bind(&n.host)
                    .bind(n.port)
                    .execute(&mut conn)
                    .await?;
            }
        }
        applied.push(change);
    }
    if rebalance {
        sqlx::query("SELECT citus_rebalance_start()")
            .execute(&mut conn)
            .await?;
    }
    let registered = registered.len() as i64
        + applied
            .iter()
            .map(|c| if matches!(c, Change::Add(_)) { 1 } else { -1 })
            .sum::<i64>();
    conn.close().await.ok();
    Ok(Membership {
        registered: registered as usize,
        desired: desired.len(),
        applied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(i: usize) -> Node {
        Node {
            host: format!("w{i}"),
            port: 5432,
        }
    }

    #[test]
    fn converged_membership_needs_nothing() {
        let nodes: Vec<_> = (0..3).map(node).collect();
        assert!(plan(&nodes, &nodes).is_empty());
    }

    #[test]
    fn missing_workers_are_added_before_strays_are_removed() {
        let registered = vec![node(0), node(9)];
        let desired: Vec<_> = (0..3).map(node).collect();
        assert_eq!(
            plan(&registered, &desired),
            vec![
                Change::Add(node(1)),
                Change::Add(node(2)),
                Change::Remove(node(9))
            ]
        );
    }

    #[test]
    fn a_lost_registration_is_restored() {
        // The race a one-shot init script loses: a worker was not up when the script ran.
        let desired: Vec<_> = (0..10).map(node).collect();
        let registered: Vec<_> = desired.iter().filter(|n| n.host != "w7").cloned().collect();
        assert_eq!(plan(&registered, &desired), vec![Change::Add(node(7))]);
    }

    #[test]
    fn same_host_other_port_is_another_node() {
        let desired = vec![node(0)];
        let registered = vec![Node {
            host: "w0".into(),
            port: 6432,
        }];
        assert_eq!(plan(&registered, &desired).len(), 2);
    }
}
