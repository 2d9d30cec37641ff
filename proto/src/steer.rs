//! Which of a DN's workers (shards) gets a QUIC datagram.
//!
//! A DN with several workers binds one UDP socket per worker to its port (`SO_REUSEPORT`). Left
//! to itself the kernel spreads datagrams over such sockets by a hash of the addresses, so a
//! client whose address changes (NAT rebinding, roaming) would land on a worker that does not
//! know its connection and be reset. Instead each worker issues connection IDs whose first
//! byte is its index modulo the worker count ([`cid_is_for`]), and a classic BPF program
//! ([`steering_program`]) attached to the socket group picks the socket from the first byte of
//! the destination connection ID ([`shard_of`]). A client's first packets carry a destination ID
//! it chose at random: they land on the worker that byte names, which then serves the
//! connection under its own IDs, so every later packet, from whatever address, reaches it too.

/// The most workers a DN shards its UDP port over (the kernel allows far more sockets in a
/// group; more workers than this would not find cores to run on).
pub const MAX_SHARDS: u8 = 64;

/// Where the first byte of the destination connection ID is in a long-header packet: after
/// the first byte, the 4-byte version and the ID's length byte (RFC 9000, 17.2).
const LONG_HEADER_DCID: usize = 6;
/// The same in a short-header packet: right after the first byte (RFC 9000, 17.3).
const SHORT_HEADER_DCID: usize = 1;
/// The header-form bit of the first byte: set for long headers.
const LONG_HEADER_FORM: u8 = 0x80;

/// The shard `datagram` belongs to: the first byte of its destination connection ID modulo
/// `shards`. A datagram too short to hold that byte goes to shard 0, as the kernel does when
/// the program reads past the end. `shards` of 0 counts as 1.
pub fn shard_of(datagram: &[u8], shards: u8) -> u8 {
    let at = match datagram.first() {
        Some(first) if first & LONG_HEADER_FORM != 0 => LONG_HEADER_DCID,
        Some(_) => SHORT_HEADER_DCID,
        None => return 0,
    };
    datagram.get(at).map_or(0, |b| b % shards.max(1))
}

/// Whether the connection ID `cid`, issued by the worker `shard` of `shards`, steers packets
/// back to that worker.
pub fn cid_is_for(cid: &[u8], shard: u8, shards: u8) -> bool {
    cid.first()
        .is_some_and(|b| b % shards.max(1) == shard % shards.max(1))
}

/// One classic BPF instruction (Linux's `struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BpfInstruction {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h): class | size | mode or operation.
const LD_B_ABS: u16 = 0x10 | 0x20; // BPF_LD (0) | BPF_B | BPF_ABS
const JMP_JA: u16 = 0x05;
const JMP_JSET_K: u16 = 0x05 | 0x40;
const ALU_MOD_K: u16 = 0x04 | 0x90;
const RET_A: u16 = 0x06 | 0x10;

/// The program that computes [`shard_of`] in the kernel, for `SO_ATTACH_REUSEPORT_CBPF` on a
/// UDP socket group (the kernel runs it on the UDP payload; its result is the index of the
/// socket in the group, in the order they were bound).
pub fn steering_program(shards: u8) -> [BpfInstruction; 7] {
    let op = |code, jt, jf, k| BpfInstruction { code, jt, jf, k };
    [
        op(LD_B_ABS, 0, 0, 0),
        // Long header: next instruction; short header: skip to the short-header load.
        op(JMP_JSET_K, 0, 2, u32::from(LONG_HEADER_FORM)),
        op(LD_B_ABS, 0, 0, LONG_HEADER_DCID as u32),
        op(JMP_JA, 0, 0, 1),
        op(LD_B_ABS, 0, 0, SHORT_HEADER_DCID as u32),
        op(ALU_MOD_K, 0, 0, u32::from(shards.max(1))),
        op(RET_A, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Classic BPF as Linux runs it, for the instructions the steering program uses: a load
    /// past the end of the packet ends the program with 0.
    fn run(program: &[BpfInstruction], packet: &[u8]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = program[pc];
            pc += 1;
            match i.code {
                LD_B_ABS => match packet.get(i.k as usize) {
                    Some(b) => a = u32::from(*b),
                    None => return 0,
                },
                JMP_JA => pc += i.k as usize,
                JMP_JSET_K => pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf }),
                ALU_MOD_K => a %= i.k,
                RET_A => return a,
                other => panic!("opcode {other:#x} is not in the steering program"),
            }
        }
    }

    fn short_header(dcid: &[u8], rest: &[u8]) -> Vec<u8> {
        [&[0x40][..], dcid, rest].concat()
    }

    fn long_header(dcid: &[u8], rest: &[u8]) -> Vec<u8> {
        [&[0xc0, 0, 0, 0, 1, dcid.len() as u8][..], dcid, rest].concat()
    }

    proptest! {
        #[test]
        fn the_kernel_program_computes_the_shard_of_any_datagram(
            packet in proptest::collection::vec(any::<u8>(), 0..40),
            shards in 1..=MAX_SHARDS,
        ) {
            let program = steering_program(shards);
            prop_assert_eq!(run(&program, &packet), u32::from(shard_of(&packet, shards)));
            prop_assert!(shard_of(&packet, shards) < shards);
        }

        #[test]
        fn every_packet_to_a_workers_connection_id_reaches_that_worker(
            cid in proptest::collection::vec(any::<u8>(), 1..=20),
            rest in proptest::collection::vec(any::<u8>(), 0..30),
            shards in 1..=MAX_SHARDS,
        ) {
            let shard = cid[0] % shards;
            prop_assert!(cid_is_for(&cid, shard, shards));
            prop_assert_eq!(shard_of(&short_header(&cid, &rest), shards), shard);
            prop_assert_eq!(shard_of(&long_header(&cid, &rest), shards), shard);
            for other in (0..shards).filter(|s| *s != shard) {
                prop_assert!(!cid_is_for(&cid, other, shards));
            }
        }
    }

    #[test]
    fn a_datagram_too_short_for_a_connection_id_goes_to_the_first_worker() {
        for packet in [&[][..], &[0x40], &[0xc0, 0, 0, 0, 1, 8]] {
            assert_eq!(shard_of(packet, 4), 0);
            assert_eq!(run(&steering_program(4), packet), 0);
        }
        assert!(!cid_is_for(&[], 0, 4));
    }

    #[test]
    fn one_shard_takes_everything() {
        assert_eq!(shard_of(&short_header(&[0xff; 8], &[]), 1), 0);
        assert_eq!(shard_of(&short_header(&[0xff; 8], &[]), 0), 0);
        assert!(cid_is_for(&[0xff], 0, 1));
    }
}
