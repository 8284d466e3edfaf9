//! Sets of small integer ids (CPUs, NUMA nodes) in the kernel's list format.
//!
//! The kernel speaks one format everywhere: `0-3,8,10-11` in sysfs `cpulist`,
//! `cpuset.cpus`, `cpuset.mems`, `Cpus_allowed_list` in `/proc/PID/status`, and numad's
//! advice output. [`IdSet`] parses and prints exactly that format, and stores ids as a
//! bitmap so set algebra stays cheap for the engine.

use std::fmt;
use std::str::FromStr;

/// A CPU number as the kernel numbers them.
pub type CpuId = u32;
/// A NUMA node number as the kernel numbers them.
pub type NodeId = u32;
/// A set of CPUs.
pub type CpuSet = IdSet;
/// A set of NUMA nodes.
pub type NodeSet = IdSet;

/// Largest id accepted when parsing, to refuse absurd input instead of allocating.
const MAX_ID: u32 = 1 << 16;

/// A set of ids, stored as a bitmap.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdSet {
    words: Vec<u64>,
}

/// Why a list such as `0-3,8` could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdSetParseError {
    #[error("bad id list element {0:?}: expected N or N-M")]
    BadElement(String),
    #[error("bad id range {0:?}: start is after end")]
    Reversed(String),
    #[error("id {0} is larger than the supported maximum {MAX_ID}")]
    TooLarge(u64),
}

impl IdSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The set `{0, 1, ..., n-1}`.
    pub fn first_n(n: u32) -> Self {
        (0..n).collect()
    }

    pub fn insert(&mut self, id: u32) {
        let (w, b) = ((id / 64) as usize, id % 64);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << b;
    }

    pub fn remove(&mut self, id: u32) {
        let (w, b) = ((id / 64) as usize, id % 64);
        if let Some(word) = self.words.get_mut(w) {
            *word &= !(1 << b);
        }
        self.trim();
    }

    pub fn contains(&self, id: u32) -> bool {
        let (w, b) = ((id / 64) as usize, id % 64);
        self.words.get(w).is_some_and(|word| word & (1 << b) != 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Ids in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &word)| {
            (0..64u32)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| i as u32 * 64 + b)
        })
    }

    pub fn first(&self) -> Option<u32> {
        self.iter().next()
    }

    pub fn union(&self, other: &Self) -> Self {
        let n = self.words.len().max(other.words.len());
        let words = (0..n).map(|i| self.word(i) | other.word(i)).collect();
        Self::from_words(words)
    }

    pub fn intersection(&self, other: &Self) -> Self {
        let n = self.words.len().min(other.words.len());
        let words = (0..n).map(|i| self.word(i) & other.word(i)).collect();
        Self::from_words(words)
    }

    pub fn difference(&self, other: &Self) -> Self {
        let words = (0..self.words.len())
            .map(|i| self.word(i) & !other.word(i))
            .collect();
        Self::from_words(words)
    }

    pub fn is_subset(&self, other: &Self) -> bool {
        (0..self.words.len()).all(|i| self.word(i) & !other.word(i) == 0)
    }

    pub fn intersects(&self, other: &Self) -> bool {
        !self.intersection(other).is_empty()
    }

    /// Parses the kernel list format (`0-3,8,10-11`); empty or whitespace-only is the
    /// empty set, as in an unset `cpuset.mems`.
    pub fn parse_list(s: &str) -> Result<Self, IdSetParseError> {
        let mut set = Self::new();
        for elem in s.trim().split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || IdSetParseError::BadElement(elem.to_string());
            let num = |t: &str| -> Result<u32, IdSetParseError> {
                let v: u64 = t.trim().parse().map_err(|_| bad())?;
                if v > MAX_ID as u64 {
                    return Err(IdSetParseError::TooLarge(v));
                }
                Ok(v as u32)
            };
            match elem.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(IdSetParseError::Reversed(elem.to_string()));
                    }
                    (a..=b).for_each(|id| set.insert(id));
                }
                None => set.insert(num(elem)?),
            }
        }
        Ok(set)
    }

    fn word(&self, i: usize) -> u64 {
        self.words.get(i).copied().unwrap_or(0)
    }

    fn from_words(words: Vec<u64>) -> Self {
        let mut s = Self { words };
        s.trim();
        s
    }

    fn trim(&mut self) {
        while self.words.last() == Some(&0) {
            self.words.pop();
        }
    }
}

impl FromIterator<u32> for IdSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut s = Self::new();
        iter.into_iter().for_each(|id| s.insert(id));
        s
    }
}

impl FromStr for IdSet {
    type Err = IdSetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_list(s)
    }
}

/// Prints the kernel list format, collapsing runs: `0-3,8,10-11`.
impl fmt::Display for IdSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u32> = self.iter().collect();
        let mut i = 0;
        let mut first = true;
        while i < ids.len() {
            let mut j = i;
            while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if j == i {
                write!(f, "{}", ids[i])?;
            } else {
                write!(f, "{}-{}", ids[i], ids[j])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

impl fmt::Debug for IdSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

impl serde::Serialize for IdSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for IdSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse_list(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_kernel_lists() {
        for (input, printed, len) in [
            ("0-3,8,10-11", "0-3,8,10-11", 7),
            ("", "", 0),
            ("\n", "", 0),
            ("5", "5", 1),
            ("0,1,2", "0-2", 3),
            ("63-65", "63-65", 3),
            (" 2-3 , 7\n", "2-3,7", 3),
        ] {
            let set = IdSet::parse_list(input).unwrap();
            assert_eq!(set.to_string(), printed, "input {input:?}");
            assert_eq!(set.len(), len, "input {input:?}");
        }
    }

    #[test]
    fn refuses_malformed_lists() {
        assert!(matches!(
            IdSet::parse_list("3-1"),
            Err(IdSetParseError::Reversed(_))
        ));
        assert!(matches!(
            IdSet::parse_list("a"),
            Err(IdSetParseError::BadElement(_))
        ));
        assert!(matches!(
            IdSet::parse_list("1-"),
            Err(IdSetParseError::BadElement(_))
        ));
        assert!(matches!(
            IdSet::parse_list("99999999999"),
            Err(IdSetParseError::TooLarge(_))
        ));
    }

    #[test]
    fn set_algebra() {
        let a = IdSet::parse_list("0-7").unwrap();
        let b = IdSet::parse_list("4-11").unwrap();
        assert_eq!(a.intersection(&b).to_string(), "4-7");
        assert_eq!(a.union(&b).to_string(), "0-11");
        assert_eq!(a.difference(&b).to_string(), "0-3");
        assert!(IdSet::parse_list("5-6").unwrap().is_subset(&a));
        assert!(!b.is_subset(&a));
        assert_eq!(a.difference(&a), IdSet::new());
    }
}
