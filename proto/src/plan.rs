//! The address plan: every DN owns a pool, split into one block per other DN (thesis 4.4).
//!
//! A client whose designated backup is DN_k gets its address from the block "backed by DN_k",
//! so on failover DN_k carries the whole block with one route instead of one per client.

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("pool {pool} is too small to split into {blocks} blocks")]
    PoolTooSmall { pool: IpNet, blocks: usize },
    #[error("block prefix /{block_prefix} does not fit pool {pool}: it needs at least /{needed} and at most /{max}")]
    BadBlockPrefix {
        pool: IpNet,
        block_prefix: u8,
        needed: u8,
        max: u8,
    },
}

/// One block of a DN's pool and the DN that carries it when the owner dies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub net: IpNet,
    /// `None` when the cluster has a single DN: nobody backs the block.
    pub backup: Option<String>,
}

/// A DN's pool and its blocks, in the order of the other DNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPlan {
    pub pool: IpNet,
    pub blocks: Vec<Block>,
}

/// Smallest prefix extension that yields `count` blocks.
fn bits_for(count: usize) -> u8 {
    let mut bits = 0u8;
    while (1usize << bits) < count {
        bits += 1;
    }
    bits
}

impl PoolPlan {
    /// Splits `pool` into one block per name in `backups` (at least one block). `block_prefix`
    /// fixes the block size; by default the blocks are as large as the split allows.
    pub fn new(
        pool: IpNet,
        backups: &[String],
        block_prefix: Option<u8>,
    ) -> Result<Self, PlanError> {
        let pool = pool.trunc();
        let count = backups.len().max(1);
        let needed = pool.prefix_len() + bits_for(count);
        // Leave at least 4 addresses per block: network, gateway, one client, broadcast.
        let max = pool.max_prefix_len().saturating_sub(2);
        if needed > max {
            return Err(PlanError::PoolTooSmall {
                pool,
                blocks: count,
            });
        }
        let prefix = block_prefix.unwrap_or(needed);
        if prefix < needed || prefix > max {
            return Err(PlanError::BadBlockPrefix {
                pool,
                block_prefix: prefix,
                needed,
                max,
            });
        }
        let nets = pool
            .subnets(prefix)
            .map_err(|_| PlanError::BadBlockPrefix {
                pool,
                block_prefix: prefix,
                needed,
                max,
            })?;
        let blocks = nets
            .zip(
                backups
                    .iter()
                    .map(|b| Some(b.clone()))
                    .chain(std::iter::once(None)),
            )
            .take(count)
            .map(|(net, backup)| Block { net, backup })
            .collect();
        Ok(Self { pool, blocks })
    }

    /// The DN's own address inside its pool: the pool's first host. It is the source of the ICMP
    /// errors the DN generates and is never leased.
    pub fn gateway(&self) -> IpAddr {
        offset(self.pool.network(), 1)
    }

    /// The block designated to be backed by `backup` (the first block if none matches).
    pub fn block_for_backup(&self, backup: Option<&str>) -> &Block {
        self.blocks
            .iter()
            .find(|b| b.backup.as_deref() == backup)
            .unwrap_or(&self.blocks[0])
    }

    /// The address of `other` (a DN's pool of the other family, split among the same backups)
    /// at the same place as `addr` in this plan: the same block index, the same offset inside
    /// the block. A dual-stack client's IPv6 address follows from its IPv4 one this way, so
    /// that one lease decides both and no second allocation can disagree with the first.
    /// `None` when `addr` is not in a block here or the offset does not fit `other`'s block.
    pub fn twin(&self, addr: IpAddr, other: &PoolPlan) -> Option<(IpAddr, IpNet)> {
        let i = self.blocks.iter().position(|b| b.net.contains(&addr))?;
        let block = other.blocks.get(i)?.net;
        let at = index_of(self.blocks[i].net.network(), addr);
        (at < size(block)).then(|| (offset(block.network(), at), block))
    }

    pub fn block_containing(&self, addr: IpAddr) -> Option<&Block> {
        self.blocks.iter().find(|b| b.net.contains(&addr))
    }

    /// Whether `addr` can be leased: inside a block, not the network or broadcast address of a
    /// block, and not the gateway.
    pub fn is_leasable(&self, addr: IpAddr) -> bool {
        let Some(block) = self.block_containing(addr) else {
            return false;
        };
        let host_index = index_of(block.net.network(), addr);
        host_index != 0 && host_index != size(block.net) - 1 && addr != self.gateway()
    }

    /// Leasable addresses of `block`, starting after index `cursor` and wrapping around. The
    /// caller skips those already leased.
    pub fn candidates(&self, block: &Block, cursor: u128) -> impl Iterator<Item = IpAddr> + '_ {
        let n = size(block.net);
        let base = block.net.network();
        (0..n)
            .map(move |i| offset(base, (cursor + i) % n))
            .filter(move |a| self.is_leasable(*a))
    }
}

fn size(net: IpNet) -> u128 {
    let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
    if host_bits >= 128 {
        u128::MAX
    } else {
        1u128 << host_bits
    }
}

fn as_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// How far `addr` lies after `base` (of the same family).
pub(crate) fn index_of(base: IpAddr, addr: IpAddr) -> u128 {
    as_u128(addr).wrapping_sub(as_u128(base))
}

fn offset(base: IpAddr, i: u128) -> IpAddr {
    match base {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a).wrapping_add(i as u32)).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a).wrapping_add(i)).into()),
    }
}

/// Whether any two of the pools overlap; returns the first overlapping pair's indices.
pub fn first_overlap(pools: &[IpNet]) -> Option<(usize, usize)> {
    for (i, a) in pools.iter().enumerate() {
        for (j, b) in pools.iter().enumerate().skip(i + 1) {
            if a.contains(b) || b.contains(a) {
                return Some((i, j));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dn{i}")).collect()
    }

    #[test]
    fn a_pool_splits_into_one_block_per_other_dn() {
        let plan = PoolPlan::new("10.200.0.0/16".parse().unwrap(), &names(3), None).unwrap();
        let nets: Vec<String> = plan.blocks.iter().map(|b| b.net.to_string()).collect();
        assert_eq!(nets, ["10.200.0.0/18", "10.200.64.0/18", "10.200.128.0/18"]);
        assert_eq!(plan.blocks[2].backup.as_deref(), Some("dn2"));
        assert_eq!(
            plan.block_for_backup(Some("dn1")).net.to_string(),
            "10.200.64.0/18"
        );
    }

    #[test]
    fn a_lone_dn_has_one_unbacked_block() {
        let plan = PoolPlan::new("10.200.0.0/24".parse().unwrap(), &[], None).unwrap();
        assert_eq!(plan.blocks.len(), 1);
        assert_eq!(plan.blocks[0].backup, None);
        assert_eq!(plan.gateway().to_string(), "10.200.0.1");
    }

    #[test]
    fn reserved_addresses_are_never_candidates() {
        let plan = PoolPlan::new("10.200.0.0/29".parse().unwrap(), &names(1), None).unwrap();
        let got: Vec<String> = plan
            .candidates(&plan.blocks[0], 0)
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            got,
            [
                "10.200.0.2",
                "10.200.0.3",
                "10.200.0.4",
                "10.200.0.5",
                "10.200.0.6"
            ]
        );
    }

    #[test]
    fn block_prefix_is_checked() {
        let pool = "10.200.0.0/24".parse().unwrap();
        assert!(PoolPlan::new(pool, &names(3), Some(25)).is_err());
        assert!(PoolPlan::new(pool, &names(3), Some(31)).is_err());
        assert_eq!(
            PoolPlan::new(pool, &names(3), Some(28))
                .unwrap()
                .blocks
                .len(),
            3
        );
        assert!(PoolPlan::new("10.0.0.0/30".parse().unwrap(), &names(2), None).is_err());
    }

    #[test]
    fn overlap_is_found() {
        let pools: Vec<IpNet> = ["10.1.0.0/16", "10.2.0.0/16", "10.2.128.0/17"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(first_overlap(&pools), Some((1, 2)));
        assert_eq!(first_overlap(&pools[..2]), None);
    }

    #[test]
    fn an_ipv6_twin_sits_at_the_same_place() {
        let v4 = PoolPlan::new("10.200.0.0/24".parse().unwrap(), &names(2), None).unwrap();
        let v6 = PoolPlan::new("fd00:200::/64".parse().unwrap(), &names(2), None).unwrap();
        let (a, b) = v4.twin("10.200.0.130".parse().unwrap(), &v6).unwrap();
        assert_eq!(
            (a.to_string(), b.to_string()),
            (
                "fd00:200::8000:0:0:2".into(),
                "fd00:200:0:0:8000::/65".into()
            )
        );
        assert_eq!(v4.twin("10.201.0.1".parse().unwrap(), &v6), None);
        // A block too small for the offset has no twin.
        let tiny = PoolPlan::new("fd00:200::/124".parse().unwrap(), &names(2), None).unwrap();
        assert_eq!(v4.twin("10.200.0.100".parse().unwrap(), &tiny), None);
    }

    proptest! {
        #[test]
        fn twins_are_leasable_and_distinct(a in 2u32..126, b in 2u32..126, n in 1usize..4) {
            let v4 = PoolPlan::new("10.200.0.0/24".parse().unwrap(), &names(n), None).unwrap();
            let v6 = PoolPlan::new("fd00:200::/64".parse().unwrap(), &names(n), None).unwrap();
            let (x, y): (IpAddr, IpAddr) = (std::net::Ipv4Addr::from(0x0ac8_0000 + a).into(), std::net::Ipv4Addr::from(0x0ac8_0000 + b).into());
            prop_assume!(v4.is_leasable(x) && v4.is_leasable(y));
            let (tx, bx) = v4.twin(x, &v6).unwrap();
            let (ty, _) = v4.twin(y, &v6).unwrap();
            prop_assert!(v6.is_leasable(tx) && bx.contains(&tx));
            prop_assert_eq!(v4.block_containing(x).unwrap().backup.clone(), v6.block_containing(tx).unwrap().backup.clone());
            prop_assert_eq!(x == y, tx == ty);
        }

        #[test]
        fn blocks_partition_without_overlap(a in any::<u32>(), len in 8u8..24, n in 0usize..9) {
            let pool = IpNet::new(std::net::Ipv4Addr::from(a).into(), len).unwrap();
            let plan = PoolPlan::new(pool, &names(n), None).unwrap();
            prop_assert_eq!(plan.blocks.len(), n.max(1));
            let nets: Vec<IpNet> = plan.blocks.iter().map(|b| b.net).collect();
            prop_assert_eq!(first_overlap(&nets), None);
            for b in &plan.blocks {
                prop_assert!(plan.pool.contains(&b.net));
                let first = plan.candidates(b, 0).next().unwrap();
                prop_assert!(b.net.contains(&first) && plan.is_leasable(first));
            }
        }

        #[test]
        fn v6_pools_work(a in any::<u128>(), len in 32u8..120, n in 0usize..5) {
            let pool = IpNet::new(std::net::Ipv6Addr::from(a).into(), len).unwrap();
            let plan = PoolPlan::new(pool, &names(n), None).unwrap();
            let b = &plan.blocks[plan.blocks.len() - 1];
            let first = plan.candidates(b, 7).next().unwrap();
            prop_assert!(b.net.contains(&first));
        }
    }
}
