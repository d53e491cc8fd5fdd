// Compiled core of the suffix drafters: the token index and draft-tree growth.
//
// TokenIndex is an append-only token arena with, for a few n-gram orders, a
// chain from every position to the previous position that ended the same
// n-gram (LZ77-style hash chains). It answers the question a suffix tree
// answers for SuffixDecoding -- where did the longest suffix of this context
// occur before, and what followed -- with a few integers per token instead of a
// node per token and depth. Sequences are separated by a boundary marker so no
// n-gram and no continuation crosses from one sequence into the next. The tail
// can be truncated exactly (chains are last-in, first-out), the oldest tokens
// can be evicted (a floor; the arena is compacted when half of it is dead), and
// the positions indexed so far can be frozen: their chains laid out as blocks,
// read without chasing links (freeze).
//
// grow_draft() turns weighted occurrences into a frequency tree of their
// continuations and expands a draft tree best first by estimated path
// probability. A Calibration (one per tenant and tokenizer) learns, from what
// the target really emitted, how often a node with a given frequency estimate,
// depth and context match is accepted, corrected by what the node's token is
// (a logistic model over hashed lexical slots), so the tree is grown -- and the
// caller sizes it -- by acceptance chances rather than raw frequencies.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <stdexcept>
#include <vector>

#include "csrc/ngram_table.h"

namespace py = pybind11;

namespace {

constexpr int32_t BOUNDARY = -1;
const std::vector<int> kDefaultOrders{1, 2, 3, 4, 6, 8, 12, 16};  // n-gram orders of an index
constexpr uint64_t BASE = 0x9E3779B97F4A7C15ULL;

// Open-addressing map from a nonzero 64-bit key to a non-negative int32 (linear probing,
// backward-shift deletion so erase leaves no tombstones). A key and its value sit
// side by side in one packed 12-byte slot: a lookup in a large index is a cache
// miss, and keys and values in separate arrays made it two.
class FlatMap {
 public:
  // Room for `expected` keys before the first growth.
  explicit FlatMap(size_t expected = 48) {
    size_t cap = 64;
    while (cap * 3 < expected * 4) cap *= 2;
    reset(cap);
  }

  // The key's value, or -1 if the key is absent.
  int32_t find(uint64_t key) const {
    size_t i = slot(key);
    while (slots_[i].key != 0) {
      if (slots_[i].key == key) return slots_[i].val;
      i = (i + 1) & mask_;
    }
    return -1;
  }

  void put(uint64_t key, int32_t value) { exchange(key, value); }

  // Ask for the key's home slot ahead of a find or exchange (the tables outgrow the caches).
  void prefetch(uint64_t key) const { __builtin_prefetch(&slots_[slot(key)]); }

  // Set the key's value; returns the value it replaces, or -1 if the key was absent
  // (one probe where a find and a put would take two).
  int32_t exchange(uint64_t key, int32_t value) {
    if ((count_ + 1) * 4 > slots_.size() * 3) grow();
    size_t i = slot(key);
    while (slots_[i].key != 0 && slots_[i].key != key) i = (i + 1) & mask_;
    int32_t old = -1;
    if (slots_[i].key == 0)
      ++count_;
    else
      old = slots_[i].val;
    slots_[i] = {key, value};
    return old;
  }

  void erase(uint64_t key) {
    size_t i = slot(key);
    while (slots_[i].key != key) {
      if (slots_[i].key == 0) return;
      i = (i + 1) & mask_;
    }
    size_t hole = i;
    size_t j = i;
    while (true) {
      j = (j + 1) & mask_;
      if (slots_[j].key == 0) break;
      size_t home = slot(slots_[j].key);
      // Move j into the hole unless its home lies cyclically in (hole, j].
      bool stays = (hole <= j) ? (hole < home && home <= j) : (hole < home || home <= j);
      if (!stays) {
        slots_[hole] = slots_[j];
        hole = j;
      }
    }
    slots_[hole].key = 0;
    --count_;
  }

  void clear() { reset(64); }
  size_t size() const { return count_; }

  // Room for `expected` keys without growing (growing rehashes every key: tens of ms for millions).
  void reserve(size_t expected) {
    while (expected * 4 > slots_.size() * 3) grow();
  }

  // Replace every value by f(key, value), in slot order.
  template <class F>
  void update_values(F&& f) {
    for (Slot& s : slots_)
      if (s.key != 0) s.val = f(s.key, s.val);
  }
  size_t capacity_bytes() const { return slots_.size() * sizeof(Slot); }

 private:
  struct __attribute__((packed)) Slot {
    uint64_t key;
    int32_t val;
  };
  static_assert(sizeof(Slot) == 12);

  static uint64_t mix(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return k;
  }
  size_t slot(uint64_t key) const { return mix(key) & mask_; }
  void reset(size_t cap) {
    slots_.assign(cap, Slot{0, 0});
    mask_ = cap - 1;
    count_ = 0;
  }
  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    reset(old.size() * 2);
    for (const Slot& s : old)
      if (s.key != 0) put(s.key, s.val);
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t count_ = 0;
};

// A set of arena positions for the span of one query, kept between queries (one per
// thread): a slot belongs to the current query only if it bears the query's stamp, so a
// new query starts without clearing or allocating a table.
class PositionSet {
 public:
  // Start an empty set with room for `expected` insertions.
  void start(size_t expected) {
    size_t cap = 64;
    while (cap < expected * 2) cap *= 2;
    if (cap > slots_.size()) {
      slots_.assign(cap, Slot{});
      shift_ = 64 - __builtin_ctzll(cap);
      stamp_ = 0;
    }
    if (++stamp_ == 0) {  // the stamps wrapped: old slots could pass for new ones
      std::fill(slots_.begin(), slots_.end(), Slot{});
      stamp_ = 1;
    }
  }
  bool contains(int32_t pos) const {
    for (size_t i = slot(pos);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].stamp != stamp_) return false;
      if (slots_[i].pos == pos) return true;
    }
  }
  void insert(int32_t pos) {
    size_t i = slot(pos);
    while (slots_[i].stamp == stamp_ && slots_[i].pos != pos) i = (i + 1) & (slots_.size() - 1);
    slots_[i] = {pos, stamp_};
  }

 private:
  struct Slot {
    int32_t pos = 0;
    uint32_t stamp = 0;
  };
  size_t slot(int32_t pos) const {
    return static_cast<size_t>((static_cast<uint64_t>(static_cast<uint32_t>(pos)) * BASE) >> shift_);
  }
  std::vector<Slot> slots_;
  int shift_ = 58;
  uint32_t stamp_ = 0;
};

struct Occurrence {
  int32_t end;        // arena position of the last matched token
  int32_t match_len;  // context tokens matching up to there
};

// The live part of a TokenIndex, copied (TokenIndex::snapshot): `tokens` were at positions
// start .. end() - 1 of the source.
struct IndexSnapshot {
  std::vector<int> orders;
  int64_t start = 0;
  std::vector<int32_t> tokens;
  int64_t end() const { return start + static_cast<int64_t>(tokens.size()); }
};

class TokenIndex {
 public:
  explicit TokenIndex(std::vector<int> orders) : orders_(std::move(orders)) {
    if (orders_.empty()) throw std::invalid_argument("TokenIndex needs at least one n-gram order");
    std::sort(orders_.begin(), orders_.end());
    if (orders_.front() < 1) throw std::invalid_argument("n-gram orders must be positive");
    heads_.resize(orders_.size());
    prev_.resize(orders_.size());
    blocks_.resize(orders_.size());
    push_keys_.resize(orders_.size());
  }

  int64_t size() const { return static_cast<int64_t>(toks_.size()); }
  int64_t floor() const { return floor_; }
  int64_t live_tokens() const { return size() - floor_; }
  int64_t frozen_tokens() const { return base_; }
  const std::vector<int32_t>& tokens() const { return toks_; }

  void start_sequence() {
    if (!toks_.empty() && toks_.back() != BOUNDARY) push(BOUNDARY);
    seq_start_ = size();
  }

  void extend(const std::vector<int32_t>& tokens) {
    for (int32_t t : tokens) {
      if (t < 0) throw std::invalid_argument("token ids must be non-negative");
      push(t);
    }
  }

  // Make the arena equal `tokens` (a single open sequence) by keeping the common
  // prefix and appending the rest; returns the number of tokens kept.
  int64_t rebase(const std::vector<int32_t>& tokens) {
    int64_t n = std::min<int64_t>(size(), static_cast<int64_t>(tokens.size()));
    int64_t keep = 0;
    while (keep < n && toks_[keep] == tokens[keep]) ++keep;
    truncate(keep);
    for (size_t i = keep; i < tokens.size(); ++i) {
      if (tokens[i] < 0) throw std::invalid_argument("token ids must be non-negative");
      push(tokens[i]);
    }
    return keep;
  }

  void truncate(int64_t length) {
    if (length < floor_) throw std::invalid_argument("cannot truncate below the eviction floor");
    if (length < base_) return thaw(length);
    while (size() > length) pop();
  }

  // Whether evict_before compacts the arena itself (the default) or leaves that to the caller, who
  // may rebuild the index from a snapshot in another thread rather than stall its own.
  bool auto_compact = true;

  void evict_before(int64_t floor) {
    floor_ = std::max(floor_, std::min(floor, size()));
    if (auto_compact && compaction_due()) compact();
  }

  // More than half of the arena is dead: compacting now keeps memory within twice the bound.
  bool compaction_due() const { return floor_ > 4096 && floor_ * 2 > size(); }

  // The first position a compaction keeps: the floor, or the start of the next sequence when the
  // floor cuts one (so no continuation starts mid-way), unless the cut sequence is the last one.
  int64_t compaction_start() const {
    if (floor_ == 0 || toks_[floor_ - 1] == BOUNDARY) return floor_;
    auto boundary = std::find(toks_.begin() + floor_, toks_.end(), BOUNDARY);
    return boundary == toks_.end() ? floor_ : (boundary - toks_.begin()) + 1;
  }

  // Drop the evicted part: index what a compaction keeps again, from scratch, at positions from 0.
  void compact() { reindex(std::vector<int32_t>(toks_.begin() + compaction_start(), toks_.end())); }

  // What a compaction would keep, copied: rebuilt into a new index (IndexSnapshot::build, which
  // may run in another thread: it reads only the copy) while this index goes on, then brought up
  // to date (catch_up) and used instead of this one.
  IndexSnapshot snapshot() const {
    int64_t start = compaction_start();
    return IndexSnapshot{orders_, start, std::vector<int32_t>(toks_.begin() + start, toks_.end())};
  }

  // Index a snapshot's tokens from scratch (compacted, since it holds only the live part), frozen
  // if asked, with room to grow by `headroom` times its size (its tokens, and each order's distinct
  // n-grams in proportion) before an array is reallocated or a table rehashed: the rebuild runs in
  // another thread, the growth after it in the caller's. A table only grows here if it would have
  // within that growth anyway.
  static TokenIndex build(const IndexSnapshot& snap, bool freeze, double headroom) {
    TokenIndex t(snap.orders);
    t.reindex(snap.tokens);
    if (freeze) t.freeze();
    if (headroom > 0) {
      const auto more = static_cast<size_t>(headroom * static_cast<double>(t.size())) + 1024;
      t.toks_.reserve(t.toks_.size() + more);
      for (auto& p : t.prev_) p.reserve(p.size() + more);
      for (auto& h : t.heads_) h.reserve(h.size() + static_cast<size_t>(headroom * static_cast<double>(h.size())));
    }
    return t;
  }

  // This index was built from `snap` of `src`: take what `src` gained since -- the tokens appended
  // after the snapshot, at most `limit` of them a call (negative: all), then its floor -- at this
  // index's positions (src's position p is p - snap.start here). True once level with `src`: this
  // index then holds what `src` holds from the snapshot's start on (the rest of a sequence src's
  // floor had cut by then is gone, as a compaction drops it), and what src has evicted since lies
  // below this index's floor, not yet compacted away.
  bool catch_up(const TokenIndex& src, const IndexSnapshot& snap, int64_t limit) {
    const int64_t from = snap.start + size();  // src's position of the next token to take
    if (size() < static_cast<int64_t>(snap.tokens.size()) || orders_ != snap.orders || floor_ != 0)
      throw std::invalid_argument("catch_up: this index is not the snapshot's rebuild, or has changed since");
    if (src.size() < from ||
        (size() == static_cast<int64_t>(snap.tokens.size()) &&
         !std::equal(snap.tokens.begin(), snap.tokens.end(), src.toks_.begin() + snap.start)))
      throw std::invalid_argument("catch_up: the source index was cut or rewritten after the snapshot");
    const int64_t stop = limit < 0 ? src.size() : std::min(src.size(), from + limit);
    for (int64_t p = from; p < stop; ++p) append(src.toks_[p]);
    if (stop < src.size()) return false;
    if (src.floor_ > snap.start) evict_before(src.floor_ - snap.start);
    return true;
  }

  // Freeze every position indexed so far: lay each n-gram's chain out as one block of its
  // positions, most recent first, ended by -1, and point the n-gram's table entry at the block.
  // A chain walk is a dependent cache miss per link; a block is a few consecutive lines whose
  // misses overlap. Appends go on as before (their chains end in a link to the frozen block);
  // a later freeze merges them in. Queries find exactly what they found before. The frozen part's
  // links (only needed to truncate) are freed: truncating into it builds the chains again (thaw).
  void freeze() {
    const auto n = static_cast<int32_t>(size());
    if (n == base_) return;
    const int32_t first = static_cast<int32_t>(std::max(base_, floor_));  // the first live position kept
    const int32_t live = n - static_cast<int32_t>(base_);
    // Walking each chain in turn would be a dependent miss per link (about a second for the
    // standard library's 3.3 M tokens). Three passes over the unfrozen positions instead, whose
    // accesses off the sequential path do not depend on one another: each position's depth along
    // its chain and where the chain goes on in the frozen part, the new blocks' starts, then each
    // position's slot handed down its chain from the head (the newest position goes first).
    std::vector<int32_t> depth(live, 0), tail(live, kNone), slot(live, -1);
    struct Copy {
      int32_t from, to, count;
    };
    std::vector<Copy> copies;
    for (size_t oi = 0; oi < orders_.size(); ++oi) {
      const std::vector<int32_t>& prev = prev_[oi];
      const std::vector<int32_t>& old = blocks_[oi];
      for (int32_t pos = first; pos < n; ++pos) {
        int32_t link = prev[pos - base_];
        if (link >= first) {
          depth[pos - base_] = depth[link - base_] + 1;
          tail[pos - base_] = tail[link - base_];
        } else {  // the frozen part's (a block, a lone position) or none (a link below the floor: evicted)
          depth[pos - base_] = 0;
          tail[pos - base_] = is_block(link) || (link >= floor_ && link < base_) ? link : kNone;
        }
      }
      copies.clear();
      std::vector<int32_t> fresh{kNone};  // block 0: the empty block, for n-grams no longer above the floor
      size_t total = 1;
      heads_[oi].update_values([&](uint64_t, int32_t head) {
        int32_t newest = kNone, count = 0, rest = head;
        if (head >= base_) {  // an unfrozen head: its chain's live positions come first
          rest = kNone;
          if (head >= first) {
            newest = head;
            count = depth[head - base_] + 1;
            rest = tail[head - base_];
          }
        }
        int32_t from = 0, kept = 0;  // what is still above the floor of the frozen part's positions
        if (is_block(rest)) {
          from = block_start(rest);
          while (old[from + kept] >= floor_) ++kept;
        } else if (rest >= floor_) {
          kept = 1;  // a lone frozen position
        }
        if (count + kept == 0) return block_ref(0);
        // An n-gram seen once (most of the long ones) is its position: no block.
        if (count + kept == 1) return count == 1 ? newest : is_block(rest) ? old[from] : rest;
        auto start = static_cast<int32_t>(total);
        if (count > 0) slot[newest - base_] = start;
        if (kept > 0) copies.push_back({is_block(rest) ? from : -1 - rest, start + count, kept});
        total += static_cast<size_t>(count + kept) + 1;  // its positions and the closing -1
        return block_ref(start);
      });
      fresh.resize(total, kNone);
      for (int32_t pos = n - 1; pos >= first; --pos) {
        int32_t at = slot[pos - base_];
        if (at < 0) continue;  // on no block of this order (a boundary, a lone n-gram, a sequence's start)
        fresh[at] = pos;
        int32_t link = prev[pos - base_];
        if (link >= first) slot[link - base_] = at + 1;
        slot[pos - base_] = -1;  // ready for the next order
      }
      for (const Copy& c : copies) {
        if (c.from >= 0)
          std::copy_n(old.begin() + c.from, c.count, fresh.begin() + c.to);
        else
          fresh[c.to] = -1 - c.from;  // a lone frozen position
      }
      blocks_[oi].swap(fresh);
      std::vector<int32_t>().swap(prev_[oi]);
    }
    base_ = n;
  }

  // Most recent occurrences of the longest suffix of `ctx` that has any (only
  // occurrences followed by a token of their sequence count). With all_orders,
  // shorter matches found on the lower orders' chains are added too (each end
  // once, with its exact match length), up to max_occ per order.
  std::vector<Occurrence> occurrences(const int32_t* ctx, int64_t ctx_len, int max_occ, int64_t exclude_end,
                                      int max_match, bool all_orders = false) const {
    std::vector<Occurrence> found;
    found.reserve(static_cast<size_t>(std::max(max_occ, 1)) * (all_orders ? orders_.size() : 1));
    // Working storage kept between queries. One thread-local lookup: references from here on
    // (in a shared library each access to a thread_local is a call).
    thread_local Scratch tls;
    Scratch& scratch = tls;
    // Positions a longer order's chain already gave (an 8-token match is on the 4-gram chain too).
    PositionSet& seen = scratch.seen;
    seen.start(static_cast<size_t>(std::max(max_occ, 1)) * orders_.size());
    int64_t limit = std::min<int64_t>(ctx_len, max_match);
    int64_t last = size() - 1;
    // A chain walk chases links through a large arena, a cache miss per link. When every order
    // is wanted, the first links of all chains are read side by side first, so their misses
    // overlap; the walk below takes them from there and only then follows links alone. What is
    // found is exactly what walking each chain alone finds.
    const int n_orders = static_cast<int>(orders_.size());
    std::vector<int32_t>& ahead = scratch.ahead;
    std::vector<Cursor>& cursor = scratch.cursor;
    std::vector<int>& ahead_count = scratch.ahead_count;  // links gathered per order
    if (all_orders) {
      ahead.assign(static_cast<size_t>(n_orders) * kAhead, -1);
      ahead_count.assign(n_orders, 0);
      cursor.assign(n_orders, Cursor{});
      // The chain heads first: one miss per order's table, all asked for before any is read.
      std::vector<uint64_t>& keys = scratch.keys;
      keys.resize(n_orders);
      for (int oi = 0; oi < n_orders; ++oi)
        if (orders_[oi] <= limit) {
          keys[oi] = hash_of(ctx + ctx_len - orders_[oi], orders_[oi]);
          heads_[oi].prefetch(keys[oi]);
        }
      for (int oi = 0; oi < n_orders; ++oi)
        if (orders_[oi] <= limit) enter(oi, heads_[oi].find(keys[oi]), cursor[oi]);
      for (int step = 0; step < kAhead; ++step) {
        bool any = false;
        for (int oi = 0; oi < n_orders; ++oi) {
          int32_t pos = cursor[oi].pos;
          if (pos < floor_) continue;
          __builtin_prefetch(&toks_[pos]);
          ahead[static_cast<size_t>(oi) * kAhead + step] = pos;
          ahead_count[oi] = step + 1;
          advance(oi, cursor[oi]);
          any = true;
        }
        if (!any) break;
      }
    }
    for (int oi = n_orders - 1; oi >= 0; --oi) {
      int order = orders_[oi];
      if (order > limit) continue;
      // Positions come from the links gathered above while they last, then from the cursor.
      const int32_t* gathered = nullptr;
      int gathered_count = 0;
      Cursor at;
      int32_t pos;
      if (all_orders) {
        gathered = &ahead[static_cast<size_t>(oi) * kAhead];
        gathered_count = ahead_count[oi];
        at = cursor[oi];  // already past the gathered links
        pos = gathered[0];
      } else {
        enter(oi, heads_[oi].find(hash_of(ctx + ctx_len - order, order)), at);
        pos = at.pos;
      }
      if (pos < 0) continue;
      int walked = 0;
      int taken = 0;
      while (pos >= floor_ && taken < max_occ && walked < 4 * max_occ) {
        ++walked;
        if (pos != exclude_end && pos < last && toks_[pos + 1] != BOUNDARY && !seen.contains(pos)) {
          int n = match_len(pos, ctx, ctx_len, static_cast<int>(limit));
          if (n >= order) {  // n < order: a hash collision
            found.push_back({pos, n});
            seen.insert(pos);
            ++taken;
          }
        }
        if (walked < gathered_count) {
          pos = gathered[walked];
        } else {
          if (walked > gathered_count) advance(oi, at);  // at == gathered_count the cursor is already there
          pos = at.pos;
        }
      }
      if (!found.empty() && !all_orders) return found;
    }
    return found;
  }

  int32_t at(int64_t pos) const { return toks_[pos]; }

  // Arena position of the token's last occurrence (-1: none, not among the last
  // few sharing its hash, or no 1-gram chain).
  int64_t last_position(int32_t tok) const {
    if (orders_.front() != 1) return -1;
    Cursor c;
    enter(0, heads_[0].find(hash_of(&tok, 1)), c);
    for (int walked = 0; c.pos >= floor_ && walked < 16; ++walked, advance(0, c))
      if (toks_[c.pos] == tok) return c.pos;  // the 1-gram hash keys two ids on one key
    return -1;
  }

  size_t memory_bytes() const {
    size_t total = toks_.capacity() * sizeof(int32_t);
    for (const auto& p : prev_) total += p.capacity() * sizeof(int32_t);
    for (const auto& b : blocks_) total += b.capacity() * sizeof(int32_t);
    for (const auto& h : heads_) total += h.capacity_bytes();
    return total;
  }

 private:
  // A table value or a chain link is a position, kNone, or a frozen block, encoded below -1. A
  // frozen position that is not in a block is its n-gram's only one (at freezing time).
  static constexpr int32_t kNone = -1;
  static bool is_block(int32_t v) { return v < kNone; }
  static int32_t block_ref(int32_t start) { return -start - 2; }
  static int32_t block_start(int32_t ref) { return -ref - 2; }

  // Where a walk down one order's chain is: a position (below the floor: the walk is over), and
  // inside a frozen block, the entry it came from.
  struct Cursor {
    int32_t pos = kNone;
    const int32_t* in_block = nullptr;
  };
  void enter(int oi, int32_t value, Cursor& c) const {
    if (is_block(value)) {
      c.in_block = &blocks_[oi][block_start(value)];
      c.pos = *c.in_block;
    } else {
      c.in_block = nullptr;
      c.pos = value;
    }
  }
  void advance(int oi, Cursor& c) const {
    if (c.in_block != nullptr)
      c.pos = *++c.in_block;  // a block ends with -1
    else if (c.pos < base_)
      c.pos = kNone;  // a frozen position outside a block: its n-gram's only one
    else
      enter(oi, prev_[oi][c.pos - base_], c);
  }

  // Polynomial hash of an n-gram, computed from its tokens (a few multiply-adds: cheaper to
  // redo than a rolling hash's 8 bytes a token are to keep).
  uint64_t hash_of(const int32_t* gram, int n) const {
    uint64_t h = 0;
    for (int i = 0; i < n; ++i) h = h * BASE + static_cast<uint64_t>(static_cast<int64_t>(gram[i]) + 2);
    return h | 1;  // never the empty key
  }

  uint64_t gram_hash(int64_t end, int order) const { return hash_of(&toks_[end + 1 - order], order); }

  int match_len(int64_t end, const int32_t* ctx, int64_t ctx_len, int limit) const {
    int n = 0;
    while (n < limit && end - n >= floor_ && toks_[end - n] == ctx[ctx_len - 1 - n]) ++n;
    return n;
  }

  void push(int32_t tok) {
    toks_.push_back(tok);
    int64_t pos = size() - 1;
    if (tok == BOUNDARY) {
      for (auto& p : prev_) p.push_back(kNone);
      return;
    }
    int64_t avail = pos - seq_start_ + 1;
    // Every order's chain head is a miss in its own table: ask for all of them before using any.
    for (size_t oi = 0; oi < orders_.size(); ++oi) {
      if (orders_[oi] > avail) continue;
      push_keys_[oi] = gram_hash(pos, orders_[oi]);
      heads_[oi].prefetch(push_keys_[oi]);
    }
    for (size_t oi = 0; oi < orders_.size(); ++oi) {
      if (orders_[oi] > avail) {
        prev_[oi].push_back(kNone);
        continue;
      }
      prev_[oi].push_back(heads_[oi].exchange(push_keys_[oi], static_cast<int32_t>(pos)));
    }
  }

  void pop() {
    int64_t pos = size() - 1;
    int32_t tok = toks_[pos];
    if (tok == BOUNDARY) {
      // The sequence before the boundary becomes the open one again.
      int64_t start = pos;
      while (start > 0 && toks_[start - 1] != BOUNDARY) --start;
      seq_start_ = start;
    } else {
      int64_t avail = pos - seq_start_ + 1;
      for (size_t oi = 0; oi < orders_.size(); ++oi) {
        int order = orders_[oi];
        if (order > avail) continue;
        uint64_t key = gram_hash(pos, order);
        if (heads_[oi].find(key) == pos) {
          int32_t before = prev_[oi][pos - base_];
          if (before != kNone)
            heads_[oi].put(key, before);
          else
            heads_[oi].erase(key);
        }
      }
    }
    for (auto& p : prev_) p.pop_back();
    toks_.pop_back();
  }

  // Cut into the frozen part (a session whose history was rewritten): frozen positions have no
  // links to undo, so the chains of what is kept are built again, unfrozen, at the same positions.
  void thaw(int64_t length) {
    int64_t floor = floor_;
    reindex(std::vector<int32_t>(toks_.begin(), toks_.begin() + length));
    floor_ = floor;
  }

  // Index `tokens` from scratch, unfrozen, as the arena's whole content.
  void reindex(const std::vector<int32_t>& tokens) {
    toks_.clear();
    for (auto& p : prev_) p.clear();
    for (auto& b : blocks_) std::vector<int32_t>().swap(b);
    for (auto& h : heads_) h.clear();
    floor_ = 0;
    base_ = 0;
    seq_start_ = 0;
    for (int32_t t : tokens) append(t);
  }

  // Push a token of another arena's content as it stands, boundary markers included.
  void append(int32_t t) {
    push(t);
    if (t == BOUNDARY) seq_start_ = size();
  }

  static constexpr int kAhead = 24;  // links of every chain read side by side (occurrences)
  struct Scratch {
    PositionSet seen;
    std::vector<int32_t> ahead;
    std::vector<Cursor> cursor;
    std::vector<int> ahead_count;
    std::vector<uint64_t> keys;  // each order's chain-head key
  };

  std::vector<int> orders_;
  std::vector<int32_t> toks_;
  // Per order: the table from an n-gram's key to its newest position (or its frozen block), the
  // link from each unfrozen position to the previous one of its n-gram (prev_[oi][pos - base_]),
  // and the frozen blocks.
  std::vector<FlatMap> heads_;
  std::vector<std::vector<int32_t>> prev_;
  std::vector<std::vector<int32_t>> blocks_;
  std::vector<uint64_t> push_keys_;  // a push's chain-head key per order
  int64_t floor_ = 0;
  int64_t base_ = 0;  // positions below it are frozen (freeze)
  int64_t seq_start_ = 0;
};

struct DraftParams {
  int max_depth = 16;
  double factor = 2.0;
  double offset = 1.0;
  double min_prob = 0.05;
  int max_occurrences = 32;
  int max_match = 32;
  // Merged mode: one frequency tree over the session's and the shared index's
  // occurrences, each weighted by length_decay^(longest - its match length) *
  // recency_decay^(its rank by recency) (* shared_weight for the shared index).
  bool merge = false;
  double length_decay = 0.0;  // 0: only the longest matches count
  double recency_decay = 1.0;
  double shared_weight = 1.0;
  // A prior index (public text, e.g. a language's standard library: no tenant's data) joins the
  // merged tree with this weight (0: not consulted), when the session's and the shared index's
  // longest match is shorter than prior_below tokens (0: always).
  double prior_weight = 0.0;
  int prior_below = 0;
  // Occurrences whose preceding tokens share more of the current context's last
  // `context_window` tokens weigh exp(context_weight * shared fraction) more (0: off).
  int context_window = 0;
  double context_weight = 0.0;
  // One-substitution resync (0: off): when the context's match is shorter than
  // resync_below, occurrences of the context *without its last token* that match at
  // least resync_min tokens and continue with another token are copies with that token
  // replaced (an edited operator in a copied line); their continuation after the
  // replaced token joins the tree with weight resync_weight.
  double resync_weight = 0.0;
  int resync_below = 3;
  int resync_min = 3;
};

// Context match lengths by doubling: 1, 2-3, 4-7, 8-15, 16-31, 32+.
int match_band(int match_len) {
  return match_len <= 1 ? 0 : match_len <= 3 ? 1 : match_len <= 7 ? 2 : match_len <= 15 ? 3 : match_len <= 31 ? 4 : 5;
}

// What a node's token is and how it competes with its siblings, as hashed feature
// slots of the Calibration's lexical correction: the shape of the choice (how many
// siblings, whether it is the heaviest, at which depth and context match), the
// token before it, the token itself, and the pair of the two. A frequency tree
// cannot see that some tokens are copied reliably (a closing quote after an
// identifier) and others are the model's own word choice (a verb after " I"); the
// correction learns it per scope.
struct Lexical {
  std::array<int32_t, 4> slots{};

  static constexpr int kShapes = 256;
  static constexpr int kBefore = 4096;
  static constexpr int kTokens = 16384;
  static constexpr int kSlots = 1 << 16;  // the rest holds the pairs

  static Lexical of(int depth, int siblings, bool heaviest, int32_t token, int32_t before, int match_len) {
    Lexical x;
    uint64_t band = depth <= 1 ? 0 : depth <= 3 ? 1 : 2;
    int m = std::min(match_band(match_len), 3);  // 8 tokens and more: one band
    x.slots[0] = (m * 3 + static_cast<int>(band)) * 16 + std::min(siblings, 8) * 2 - 2 + (heaviest ? 1 : 0);
    uint64_t tok = static_cast<uint32_t>(token), prev = static_cast<uint32_t>(before);
    x.slots[1] = kShapes + static_cast<int32_t>(mix(prev << 2 | band) % kBefore);
    x.slots[2] = kShapes + kBefore + static_cast<int32_t>(mix(tok << 2 | band) % kTokens);
    constexpr int kPairs = kSlots - kShapes - kBefore - kTokens;
    x.slots[3] = kShapes + kBefore + kTokens + static_cast<int32_t>(mix((prev << 32 | tok) ^ band << 62) % kPairs);
    return x;
  }

  static uint64_t mix(uint64_t z) {  // splitmix64's finaliser
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
};

struct Draft {
  std::vector<int32_t> tokens;
  std::vector<int32_t> parents;
  std::vector<double> probs;   // acceptance chance of each node's path (calibrated when a Calibration is given)
  std::vector<double> raws;    // the frequency tree's own path probability (what calibration learns from)
  std::vector<int32_t> depths;
  std::vector<int8_t> kinds;   // Support::kind() of each node
  std::vector<double> bases;   // the calibration table's estimate before the lexical correction
  std::vector<Lexical> lexical;
  std::vector<int32_t> cells;  // each node's Calibration cell (-1: grown without a calibration)
  int match_len = 0;
  void clear() {  // keeps the capacity: a session's draft reuses its buffers step after step
    tokens.clear();
    parents.clear();
    probs.clear();
    raws.clear();
    depths.clear();
    kinds.clear();
    bases.clear();
    lexical.clear();
    cells.clear();
    match_len = 0;
  }
  void reserve(size_t n) {
    tokens.reserve(n);
    parents.reserve(n);
    probs.reserve(n);
    raws.reserve(n);
    depths.reserve(n);
    kinds.reserve(n);
    bases.reserve(n);
    lexical.reserve(n);
    cells.reserve(n);
  }
  double expected() const {
    double s = 0;
    for (double p : probs) s += p;
    return s;
  }
};

// How a draft node is supported: how recently the session itself showed its
// continuation (or, when only the tenant's earlier responses did, how recently the
// session used the node's token at all), by how many occurrences, and how much the
// best of them shares the current context. Both change how far a frequency estimate can be trusted: a
// continuation seen a few hundred tokens ago in this session is likelier than
// its frequency says, one seen once in another run less.
struct Support {
  int64_t nearest = -1;  // tokens back to the closest session occurrence (-1: none)
  int32_t count = 0;     // occurrences behind the node
  float overlap = -1;    // best context overlap of the occurrences behind the node (-1: not measured)
  int64_t token_back = -1;  // tokens back to the node's token anywhere in the session (-1: never)

  int kind() const {
    int recency;
    if (nearest >= 0)
      recency = nearest <= 64 ? 0 : nearest <= 1024 ? 1 : nearest <= 16384 ? 2 : 3;
    else  // only other sessions' responses show it: has this session used the token at all?
      recency = token_back < 0 ? 4 : token_back <= 64 ? 5 : token_back <= 1024 ? 6 : 7;
    int many = count <= 1 ? 0 : count <= 3 ? 1 : 2;
    int ctx = overlap < 0 ? 0 : overlap < 0.25f ? 0 : overlap < 0.5f ? 1 : 2;
    return (ctx * 8 + recency) * 3 + many;
  }
  static constexpr int kKinds = 72;
};

// Acceptance chances of draft nodes, learned online per scope. Raw path
// probabilities of a frequency tree are biased in ways that depend on depth, on
// how long the context match was and on how the node is supported (deep nodes
// of short matches are over-rated, the first node of a long match under-rated),
// and a tree grown or sized on biased numbers spends its budget in the wrong
// places. Cells are (depth, raw probability on a log scale, context match,
// support kind); each keeps decayed counts of nodes drafted and accepted, with
// the raw estimate as a weak prior.
class Calibration {
 public:
  static constexpr int kDepths = 12;
  static constexpr int kProbs = 24;
  static constexpr int kMatches = 6;
  static constexpr int kCells = kDepths * kProbs * kMatches * Support::kKinds;

  double estimate(int depth, double raw, int match_len, int kind) const {
    return estimate_at(cell(depth, raw, match_len, kind), raw);
  }
  double estimate_at(int c, double raw) const {
    return (cells_[c].accepted + kPrior * raw) / (cells_[c].drafted + kPrior);
  }
  // Ask for what estimate_at(c, ...) and corrected(..., x) will read: the tables are larger than
  // the caches, and a node's siblings are judged together, so their misses can overlap.
  void prefetch(int c, const Lexical& x) const {
    __builtin_prefetch(&cells_[c]);
    for (int32_t s : x.slots) __builtin_prefetch(&slots_[s]);
  }

  // The table's estimate corrected by the node's lexical features: a logistic
  // model on top of the table (its logit plus one learned weight per active slot),
  // so it starts as the table and learns only what the table's cells cannot key on.
  double corrected(double base, const Lexical& x) const {
    float w = 0.0f;
    for (int32_t s : x.slots) w += slots_[s].weight;
    if (w == 0.0f) return base;  // nothing learned for these slots yet: the table's estimate
    // Single precision is plenty for ranking nodes, and is what keeps this cheap per node.
    float b = std::clamp(static_cast<float>(base), 1e-4f, 1.0f - 1e-4f);
    return 1.0f / (1.0f + (1.0f - b) / b * std::exp(-w));
  }

  void observe(int depth, double raw, int match_len, int kind, bool accepted) {
    observe_at(cell(depth, raw, match_len, kind), accepted);
  }
  void observe_at(int c, bool accepted) {
    Cell& counts = cells_[c];
    if (counts.drafted >= kHalveAt) {  // keep adapting: old evidence fades
      counts.drafted *= 0.5f;
      counts.accepted *= 0.5f;
    }
    counts.drafted += 1.0f;
    counts.accepted += accepted ? 1.0f : 0.0f;
    ++observed_;
  }

  // Learn from a draft and the tokens the target emitted after it. What is
  // estimated is a node's *path* being accepted, so a node under a rejected
  // ancestor counts as rejected. A node whose path matches everything emitted so
  // far but reaches deeper (not sent, or cut by a shorter verification) teaches
  // nothing.
  void observe_draft(const Draft& d, const std::vector<int32_t>& emitted) {
    enum : int8_t { kRejected, kAccepted, kUnknown };
    thread_local std::vector<int8_t> kept_state;  // kept between steps: no allocation per step
    std::vector<int8_t>& state = kept_state;
    state.assign(d.tokens.size(), kUnknown);
    for (size_t i = 0; i < d.tokens.size(); ++i) {
      int32_t parent = d.parents[i];
      int8_t above = parent >= 0 ? state[parent] : kAccepted;
      int depth = d.depths[i];
      if (above == kRejected)
        state[i] = kRejected;
      else if (above == kAccepted && depth <= static_cast<int>(emitted.size()))
        state[i] = emitted[depth - 1] == d.tokens[i] ? kAccepted : kRejected;
      if (state[i] == kUnknown) continue;
      bool accepted = state[i] == kAccepted;
      // The growth kept each node's cell (the same function of the same numbers): no log2 again,
      // unless the tree was grown without a calibration (-1).
      int c = d.cells[i];
      observe_at(c >= 0 ? c : cell(depth, d.raws[i], d.match_len, d.kinds[i]), accepted);
      learn_lexical(d.bases[i], d.lexical[i], accepted);
    }
  }

  int64_t observed() const { return observed_; }
  static int cell_of(int depth, double raw, int match_len, int kind) { return cell(depth, raw, match_len, kind); }

  // The learned state as bytes (a header names the layout), so a restarted or new
  // replica can start from what another one learned. Every float is stored in 16 bits
  // (bfloat16, within 0.4 % of the value): a snapshot of each changed tenant travels to
  // Redis every half minute, and chances from counts and weights that close rank nearly the same.
  py::bytes dump() const {
    std::string out;
    uint32_t head[2] = {kMagic, static_cast<uint32_t>(kCells)};
    out.reserve(sizeof(head) + sizeof(observed_) + float_count() * sizeof(uint16_t));
    out.append(reinterpret_cast<const char*>(head), sizeof(head));
    out.append(reinterpret_cast<const char*>(&observed_), sizeof(observed_));
    each_float(*this, [&](const float& v) {
      uint16_t h = to_bf16(v);
      out.append(reinterpret_cast<const char*>(&h), sizeof(h));
    });
    return py::bytes(out);
  }

  // Replace the state by a dump's; false (and nothing changed) if it is not one of this
  // layout. A dump of the previous layout (the same cells in 32-bit floats) loads too, so
  // snapshots stored by an older replica are not thrown away.
  bool load(const py::bytes& data) {
    std::string in = data;
    uint32_t head[2];
    size_t prefix = sizeof(head) + sizeof(observed_);
    if (in.size() < prefix) return false;
    std::memcpy(head, in.data(), sizeof(head));
    if (head[1] != static_cast<uint32_t>(kCells)) return false;
    size_t width = head[0] == kMagic ? sizeof(uint16_t) : head[0] == kMagicFloat32 ? sizeof(float) : 0;
    if (width == 0 || in.size() != prefix + float_count() * width) return false;
    std::memcpy(&observed_, in.data() + sizeof(head), sizeof(observed_));
    const char* at = in.data() + prefix;
    each_float(*this, [&](float& v) {
      if (width == sizeof(float)) {
        std::memcpy(&v, at, sizeof(float));
      } else {
        uint16_t h;
        std::memcpy(&h, at, sizeof(h));
        v = from_bf16(h);
      }
      at += width;
    });
    return true;
  }

 private:
  static constexpr uint32_t kMagic = 0x34434451;         // "QDC4": table, lexical correction, step sizes (bf16)
  static constexpr uint32_t kMagicFloat32 = 0x33434451;  // "QDC3": the same in 32-bit floats

  static uint16_t to_bf16(float f) {  // round to nearest even (the values are finite)
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    u += 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
  static float from_bf16(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }

  // Every learned float in dump order (all cells' drafted counts, then their accepted counts,
  // the slots' weights, then their squared-gradient sums); const for dump, writable for load.
  template <class Self, class F>
  static void each_float(Self& self, F&& f) {
    for (auto& c : self.cells_) f(c.drafted);
    for (auto& c : self.cells_) f(c.accepted);
    for (auto& x : self.slots_) f(x.weight);
    for (auto& x : self.slots_) f(x.sq);
  }
  static constexpr size_t float_count() { return 2 * (kCells + Lexical::kSlots); }
  static constexpr float kPrior = 2.0f;
  static constexpr float kHalveAt = 4096.0f;
  // Step of the correction's online logistic regression, per slot divided by the root of its
  // summed squared gradients (AdaGrad): a rare token's slot learns from its first few nodes, a
  // common one settles instead of following the last few.
  static constexpr float kRate = 0.5f;
  static constexpr float kMaxWeight = 4.0f;
  static constexpr float kMaxSquares = 4096.0f;  // the step never falls below kRate / 64: keep adapting

  void learn_lexical(double base, const Lexical& x, bool accepted) {
    float g = static_cast<float>((accepted ? 1.0 : 0.0) - corrected(base, x));
    for (int32_t s : x.slots) {
      Slot& slot = slots_[s];
      slot.sq = std::min(slot.sq + g * g, kMaxSquares);
      slot.weight = std::clamp(slot.weight + kRate * g / std::sqrt(1.0f + slot.sq), -kMaxWeight, kMaxWeight);
    }
  }

  static int cell(int depth, double raw, int match_len, int kind) {
    static constexpr int depth_edges[kDepths] = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64};
    int d = kDepths - 1;
    for (int i = 0; i < kDepths; ++i)
      if (depth <= depth_edges[i]) {
        d = i;
        break;
      }
    // Thirds of a halving per bin: 1, 0.79, 0.63, 0.5, ... down to ~0.004.
    int p = raw <= 0 ? kProbs - 1 : std::min(kProbs - 1, static_cast<int>(std::floor(-std::log2(raw) * 3.0)));
    int m = match_band(match_len);
    int k = std::clamp(kind, 0, Support::kKinds - 1);
    return ((d * kProbs + p) * kMatches + m) * Support::kKinds + k;
  }

  // What one lookup reads sits together (a node's estimate reads both counts of its cell, a
  // correction reads each slot's weight and learns its step size): the tables are larger than
  // the caches, so each pair costs one miss instead of two.
  struct Cell {
    float drafted = 0;
    float accepted = 0;
  };
  struct Slot {
    float weight = 0;
    float sq = 0;  // summed squared gradients of the slot
  };
  std::array<Cell, kCells> cells_{};
  std::array<Slot, Lexical::kSlots> slots_{};
  int64_t observed_ = 0;
};

struct TrieNode {
  int32_t token;
  double weight;
  int32_t first_child;
  int32_t next_sibling;
  // The occurrences through this node: pool[first_occ, first_occ + n_occ), in their given order.
  int32_t first_occ;
  int32_t n_occ;
};

struct Weighted {
  const TokenIndex* index;
  int32_t end;
  double weight;
  float overlap = -1;
};

// grow_draft's working storage. The heap orders small items; what a node needs once it is
// taken waits in `considered`.
struct GrowScratch {
  struct Considered {
    double raw;
    double base;
    Lexical lexical;
    int32_t trie_node;
    int32_t parent;
    int32_t depth;
    int32_t kind;
    int32_t cell;
  };
  struct Item {
    double prob;
    int32_t serial;  // index into `considered`; the earlier wins a tie
    bool operator<(const Item& o) const { return prob < o.prob || (prob == o.prob && serial > o.serial); }
  };
  std::vector<TrieNode> trie;
  std::vector<Support> support;
  std::vector<int32_t> pool, child_of, fill;
  std::vector<Considered> considered;
  std::vector<Item> heap;
  struct Child {  // a child being judged: what its lookups need, worked out before any is read
    int32_t node;
    int32_t kind;
    int32_t cell;
    double raw;
    Lexical lexical;
  };
  std::vector<Child> children;
};

// Frequency tree of the occurrences' continuations, expanded best first by
// acceptance chance (the calibrated path probability when `cal` is given, else
// the raw one). A node's chance never exceeds its parent's, so every prefix of
// the node list is the best tree of its size and callers may cut it anywhere.
void grow_draft(Draft& draft, const std::vector<Weighted>& occs, int max_depth, int budget, double min_prob,
                int match_len, const Calibration* cal = nullptr, const TokenIndex* session = nullptr) {
  draft.clear();
  draft.match_len = match_len;
  if (occs.empty() || budget <= 0 || max_depth <= 0) return;
  draft.reserve(static_cast<size_t>(budget));
  // The frequency tree is built lazily: a node's children are made from the occurrences through it
  // when the node is expanded, so the branches of short, scattered matches are never walked
  // beyond what the best-first growth reaches. Children are made in the order an eager build
  // (each occurrence walked to full depth in turn) would make them, and their weights are summed
  // in the same order, so the tree -- and the draft -- is the same.
  // Working storage is kept between calls (one set per thread); its buffers only grow. One
  // thread-local lookup, then references (the lambdas below would otherwise look it up per use).
  thread_local GrowScratch tls;
  GrowScratch& scratch = tls;
  std::vector<TrieNode>& trie = scratch.trie;
  std::vector<Support>& support = scratch.support;
  std::vector<int32_t>& pool = scratch.pool;          // occurrence indices, grouped by node
  std::vector<int32_t>& child_of = scratch.child_of;  // the child each occurrence goes to (-1: it ends here)
  std::vector<int32_t>& fill = scratch.fill;          // next free pool slot of each new child
  trie.clear();
  support.assign(1, Support{});
  pool.resize(occs.size());
  for (size_t i = 0; i < occs.size(); ++i) pool[i] = static_cast<int32_t>(i);
  trie.push_back({-1, 0.0, -1, -1, 0, static_cast<int32_t>(occs.size())});
  // Make the children (at `depth`) of a node that has none yet.
  auto expand = [&](int32_t node, int depth) {
    const int32_t first = trie[node].first_occ, n = trie[node].n_occ;
    const int32_t first_new = static_cast<int32_t>(trie.size());
    child_of.assign(n, -1);
    for (int32_t j = 0; j < n; ++j) {
      const Weighted& occ = occs[pool[first + j]];
      int64_t pos = occ.end + depth;
      if (pos >= occ.index->size()) continue;
      int32_t tok = occ.index->at(pos);
      if (tok == BOUNDARY) continue;
      int32_t child = trie[node].first_child;
      while (child >= 0 && trie[child].token != tok) child = trie[child].next_sibling;
      if (child < 0) {
        child = static_cast<int32_t>(trie.size());
        trie.push_back({tok, 0.0, -1, trie[node].first_child, 0, 0});
        support.emplace_back();
        trie[node].first_child = child;
      }
      trie[child].weight += occ.weight;
      ++trie[child].n_occ;
      Support& s = support[child];
      ++s.count;
      s.overlap = std::max(s.overlap, occ.overlap);
      int64_t back = occ.index == session ? session->size() - occ.end : -1;
      if (back >= 0 && (s.nearest < 0 || back < s.nearest)) s.nearest = back;
      child_of[j] = child;
    }
    const int32_t n_new = static_cast<int32_t>(trie.size()) - first_new;
    if (n_new == 0) return;
    // Group the occurrences by child at the pool's end, each group in the node's order.
    fill.resize(n_new);
    int32_t at = static_cast<int32_t>(pool.size());
    for (int32_t c = 0; c < n_new; ++c) {
      trie[first_new + c].first_occ = fill[c] = at;
      at += trie[first_new + c].n_occ;
    }
    pool.resize(at);
    for (int32_t j = 0; j < n; ++j)
      if (child_of[j] >= 0) pool[fill[child_of[j] - first_new]++] = pool[first + j];
  };
  // The heap orders small items; what a node needs once it is taken waits in `considered`.
  std::vector<GrowScratch::Considered>& considered = scratch.considered;
  considered.clear();
  // The token before a root is the context's last one (none known: the boundary marker).
  int32_t before_root = session != nullptr && session->size() > 0 ? session->at(session->size() - 1) : BOUNDARY;
  std::vector<GrowScratch::Item>& heap = scratch.heap;  // a max-heap (std::push_heap / pop_heap)
  heap.clear();
  std::vector<GrowScratch::Child>& children = scratch.children;
  auto push_children = [&](int32_t node, int32_t parent, double parent_prob, double parent_raw, int32_t depth) {
    if (depth > max_depth) return;
    expand(node, depth);
    double total = 0, heaviest = 0;
    int siblings = 0;
    for (int32_t c = trie[node].first_child; c >= 0; c = trie[c].next_sibling) {
      total += trie[c].weight;
      heaviest = std::max(heaviest, trie[c].weight);
      ++siblings;
    }
    if (total <= 0) return;
    int32_t before = node == 0 ? before_root : trie[node].token;
    // Two passes: the first works out every child's calibration cell and lexical slots and asks
    // for them, the second reads them (one child's misses no longer wait for the previous one's).
    children.clear();
    for (int32_t c = trie[node].first_child; c >= 0; c = trie[c].next_sibling) {
      double raw = parent_raw * trie[c].weight / total;
      Support& sup = support[c];
      // Only a node no session occurrence supports is keyed by its token's recency: look it
      // up here, for the nodes considered, rather than for every node of the frequency tree.
      if (sup.nearest < 0 && session != nullptr) {
        int64_t last = session->last_position(trie[c].token);
        if (last >= 0) sup.token_back = session->size() - 1 - last;
      }
      int kind = sup.kind();
      GrowScratch::Child& child = children.emplace_back();
      child.node = c;
      child.kind = kind;
      child.raw = raw;
      if (cal != nullptr) {
        child.cell = Calibration::cell_of(depth, raw, match_len, kind);
        child.lexical = Lexical::of(depth, siblings, trie[c].weight >= heaviest, trie[c].token, before, match_len);
        cal->prefetch(child.cell, child.lexical);
      }
    }
    for (const GrowScratch::Child& child : children) {
      double base = child.raw, p = child.raw;
      if (cal != nullptr) {
        base = cal->estimate_at(child.cell, child.raw);
        p = std::min(parent_prob, cal->corrected(base, child.lexical));
      }
      if (p < min_prob) continue;
      heap.push_back({p, static_cast<int32_t>(considered.size())});
      std::push_heap(heap.begin(), heap.end());
      considered.push_back({child.raw, base, child.lexical, child.node, parent, depth, child.kind,
                            cal != nullptr ? child.cell : -1});
    }
  };
  push_children(0, -1, 1.0, 1.0, 1);
  while (!heap.empty() && static_cast<int>(draft.tokens.size()) < budget) {
    std::pop_heap(heap.begin(), heap.end());
    GrowScratch::Item top = heap.back();
    heap.pop_back();
    const GrowScratch::Considered it = considered[top.serial];  // a copy: push_children grows the vector
    draft.tokens.push_back(trie[it.trie_node].token);
    draft.parents.push_back(it.parent);
    draft.probs.push_back(top.prob);
    draft.raws.push_back(it.raw);
    draft.depths.push_back(it.depth);
    draft.kinds.push_back(static_cast<int8_t>(it.kind));
    draft.cells.push_back(it.cell);
    draft.bases.push_back(it.base);
    draft.lexical.push_back(it.lexical);
    push_children(it.trie_node, static_cast<int32_t>(draft.tokens.size()) - 1, top.prob, it.raw, it.depth + 1);
  }
}

int depth_for(const DraftParams& p, int match_len) {
  return std::min(p.max_depth, static_cast<int>(std::floor(p.factor * match_len + p.offset)));
}

void draft_from(Draft& out, const TokenIndex& index, const int32_t* ctx, int64_t ctx_len, int64_t exclude_end,
                int budget, const DraftParams& p) {
  out.clear();
  auto occs = index.occurrences(ctx, ctx_len, p.max_occurrences, exclude_end, p.max_match);
  if (occs.empty()) return;
  int best = 0;
  for (const auto& o : occs) best = std::max(best, static_cast<int>(o.match_len));
  // The deepest matched node of a suffix tree holds only the longest matches.
  std::vector<Weighted> deepest;
  for (const auto& o : occs)
    if (o.match_len == best) deepest.push_back({&index, o.end, 1.0});
  grow_draft(out, deepest, depth_for(p, best), budget, p.min_prob, best);
}

// The distinct tokens of the `w` positions before the last `skip` of a sequence
// ending at `end` (fewer at a sequence start), sorted, with a 256-bit filter of
// their low bits: most tokens of an occurrence's window are not in the current one,
// and the filter says so without a search.
struct Window {
  static constexpr int kMax = 64;  // the context window is clamped to this
  std::array<int32_t, kMax> tokens;
  int n = 0;
  std::array<uint64_t, 4> filter{};
  bool may_hold(int32_t t) const { return (filter[(t >> 6) & 3] >> (t & 63)) & 1; }
};

void window_before(Window& out, const TokenIndex& index, int64_t end, int skip, int w) {
  w = std::min(w, Window::kMax);
  out.n = 0;
  out.filter = {};
  for (int64_t pos = end - skip; pos > end - skip - w && pos >= index.floor(); --pos) {
    int32_t t = index.at(pos);
    if (t == BOUNDARY) break;
    out.tokens[out.n++] = t;
    out.filter[(t >> 6) & 3] |= uint64_t{1} << (t & 63);
  }
  std::sort(out.tokens.begin(), out.tokens.begin() + out.n);
  out.n = static_cast<int>(std::unique(out.tokens.begin(), out.tokens.begin() + out.n) - out.tokens.begin());
}

// Share of the distinct tokens of `mine` (at most 64) that also occur in the `w`
// positions before the last `skip` of a sequence ending at `end`.
float overlap_with(const Window& mine, const TokenIndex& index, int64_t end, int skip, int w) {
  if (mine.n == 0) return 0.0f;
  uint64_t hit = 0;
  const int32_t* first = mine.tokens.data();
  const int32_t* stop = first + mine.n;
  for (int64_t pos = end - skip; pos > end - skip - w && pos >= index.floor(); --pos) {
    int32_t t = index.at(pos);
    if (t == BOUNDARY) break;
    if (!mine.may_hold(t)) continue;
    const int32_t* it = std::lower_bound(first, stop, t);
    if (it != stop && *it == t) hit |= uint64_t{1} << (it - first);
  }
  return static_cast<float>(__builtin_popcountll(hit)) / static_cast<float>(mine.n);
}

// The session's own context window before a match of each length, built on first use
// (the windows' storage is kept between steps, one set per thread).
class ContextWindows {
 public:
  ContextWindows(const TokenIndex& session, int w) : session_(session), w_(w), kept_(tls()) {
    if (++kept_.steps == 0) {  // wrapped: a stale window could pass for this step's
      std::fill(kept_.built_in.begin(), kept_.built_in.end(), 0);
      kept_.steps = 1;
    }
    step_ = kept_.steps;
  }
  const Window& get(int skip) {
    std::vector<Window>& by_skip = kept_.by_skip;
    std::vector<uint32_t>& built_in = kept_.built_in;
    if (skip >= static_cast<int>(by_skip.size())) {
      by_skip.resize(skip + 1);
      built_in.resize(skip + 1, 0);
    }
    if (built_in[skip] != step_) {
      window_before(by_skip[skip], session_, session_.size() - 1, skip, w_);
      built_in[skip] = step_;
    }
    return by_skip[skip];
  }

 private:
  struct Kept {
    std::vector<Window> by_skip;
    std::vector<uint32_t> built_in;  // the step that built each window
    uint32_t steps = 0;
  };
  static Kept& tls() {
    thread_local Kept kept;
    return kept;
  }
  const TokenIndex& session_;
  int w_;
  Kept& kept_;
  uint32_t step_ = 0;
};

// Weight of each occurrence: length_decay^(longest - its match) for shorter
// matches, the source's weight, recency_decay^(rank), and -- with a context
// window -- exp(context_weight * overlap), where overlap is the share of the
// tokens just before the current match that also precede the occurrence's match.
// Agent text reuses phrasing near the words it is about (a file name, an
// identifier); the occurrence whose surroundings share them is the likelier copy.
void add_weighted(std::vector<Weighted>& out, const TokenIndex& index, const std::vector<Occurrence>& occs,
                  int longest, double source_weight, const DraftParams& p, ContextWindows* windows) {
  // Occurrences come most recent first within each order; rank them by position instead.
  constexpr int kMaxGap = 64;  // gaps in match length cached (longer ones are computed each time)
  struct Kept {
    std::vector<Occurrence> sorted;
    std::vector<double> decay_pow;  // length_decay^k, NaN: not computed yet
    double decay_of = -1;
  };
  thread_local Kept tls;
  Kept& kept = tls;
  std::vector<Occurrence>& sorted = kept.sorted;
  sorted.assign(occs.begin(), occs.end());
  std::sort(sorted.begin(), sorted.end(), [](const Occurrence& a, const Occurrence& b) { return a.end > b.end; });
  // The factors take few distinct values per step: computed once each (the same calls, so the same values).
  std::vector<double>& decay_pow = kept.decay_pow;
  if (kept.decay_of != p.length_decay) {
    decay_pow.assign(kMaxGap + 1, std::nan(""));
    kept.decay_of = p.length_decay;
  }
  if (windows != nullptr) {
    // Each occurrence's context window is read below, mostly from lines no cache holds: ask for
    // every window's first and last line before comparing any.
    const int32_t* toks = index.tokens().data();
    for (const auto& o : sorted) {
      int64_t last = o.end - o.match_len, first = std::max(index.floor(), last - p.context_window + 1);
      if (last < index.floor()) continue;
      __builtin_prefetch(toks + last);
      __builtin_prefetch(toks + first);
    }
  }
  double recency = 1.0;
  for (const auto& o : sorted) {
    double w = source_weight * recency;
    if (o.match_len < longest) {
      int gap = longest - o.match_len;
      double f = 0.0;
      if (p.length_decay > 0) {
        if (gap >= static_cast<int>(decay_pow.size())) {
          f = std::pow(p.length_decay, gap);
        } else {
          if (std::isnan(decay_pow[gap])) decay_pow[gap] = std::pow(p.length_decay, gap);
          f = decay_pow[gap];
        }
      }
      w *= f;
    }
    float overlap = -1;
    if (w > 0 && windows != nullptr) {
      overlap = overlap_with(windows->get(o.match_len), index, o.end, o.match_len, p.context_window);
      w *= std::exp(p.context_weight * overlap);
    }
    if (w > 0) out.push_back({&index, o.end, w, overlap});
    recency *= p.recency_decay;
  }
}

void propose_merged(Draft& out, const TokenIndex& session, const TokenIndex* shared, const TokenIndex* prior,
                    const int32_t* ctx, int64_t ctx_len, int budget, const DraftParams& p, const Calibration* cal) {
  out.clear();
  bool all_orders = p.length_decay > 0;
  auto own = session.occurrences(ctx, ctx_len, p.max_occurrences, session.size() - 1, p.max_match, all_orders);
  std::vector<Occurrence> other;
  if (shared != nullptr && shared->live_tokens() > 0)
    other = shared->occurrences(ctx, ctx_len, p.max_occurrences, -1, p.max_match, all_orders);
  int longest = 0;
  for (const auto& o : own) longest = std::max(longest, static_cast<int>(o.match_len));
  for (const auto& o : other) longest = std::max(longest, static_cast<int>(o.match_len));
  if (p.prior_weight <= 0 || (prior != nullptr && prior->live_tokens() == 0)) prior = nullptr;
  if (p.prior_below > 0 && longest >= p.prior_below) prior = nullptr;
  std::vector<Occurrence> public_text;
  if (prior != nullptr) public_text = prior->occurrences(ctx, ctx_len, p.max_occurrences, -1, p.max_match, all_orders);
  for (const auto& o : public_text) longest = std::max(longest, static_cast<int>(o.match_len));
  thread_local std::vector<Weighted> kept_weighted;
  std::vector<Weighted>& weighted = kept_weighted;
  weighted.clear();
  int w = std::clamp(p.context_window, 0, Window::kMax);
  ContextWindows windows{session, w};
  ContextWindows* win = w > 0 ? &windows : nullptr;
  add_weighted(weighted, session, own, longest, 1.0, p, win);
  if (shared != nullptr) add_weighted(weighted, *shared, other, longest, p.shared_weight, p, win);
  if (prior != nullptr) add_weighted(weighted, *prior, public_text, longest, p.prior_weight, p, win);
  int depth = longest > 0 ? depth_for(p, longest) : 0;
  if (p.resync_weight > 0 && longest < p.resync_below && ctx_len > p.resync_min) {
    int32_t last_tok = ctx[ctx_len - 1];
    auto resync = [&](const TokenIndex& index, int64_t exclude, double source_weight) {
      auto occs = index.occurrences(ctx, ctx_len - 1, p.max_occurrences, exclude, p.max_match, false);
      for (const auto& o : occs) {
        if (o.match_len < p.resync_min || o.end + 2 >= index.size()) continue;
        int32_t replaced = index.at(o.end + 1);
        if (replaced == last_tok || replaced == BOUNDARY) continue;
        weighted.push_back({&index, o.end + 1, p.resync_weight * source_weight, -1});
        depth = std::max(depth, depth_for(p, o.match_len));
      }
    };
    resync(session, session.size() - 2, 1.0);
    if (shared != nullptr && shared->live_tokens() > 0) resync(*shared, -1, p.shared_weight);
  }
  if (weighted.empty()) return;
  grow_draft(out, weighted, depth, budget, p.min_prob, longest, cal, &session);
}

// Draft for a session: its own index (context = its tail) and optionally a shared
// index of earlier responses. Unmerged (SuffixDecoding's rule): the tree promising
// more accepted tokens wins; merged: one tree over both.
void propose(Draft& out, const TokenIndex& session, const TokenIndex* shared, int budget, const DraftParams& p,
             const Calibration* cal = nullptr, const TokenIndex* prior = nullptr) {
  out.clear();
  const auto& toks = session.tokens();
  int64_t n = static_cast<int64_t>(toks.size());
  if (n == 0 || budget <= 0) return;
  int64_t ctx_len = std::min<int64_t>(n, p.max_match);
  const int32_t* ctx = toks.data() + (n - ctx_len);
  if (p.merge) return propose_merged(out, session, shared, prior, ctx, ctx_len, budget, p, cal);
  draft_from(out, session, ctx, ctx_len, n - 1, budget, p);
  if (shared != nullptr && shared->live_tokens() > 0) {
    Draft other;
    draft_from(other, *shared, ctx, ctx_len, -1, budget, p);
    if (other.expected() > out.expected()) std::swap(out, other);
  }
}

// Union of several drafters' trees: a node's probability is the highest of its
// drafters' (scaled, capped at 1) estimates; the best `budget` nodes are kept.
// Scaled path probabilities never exceed their parent's, so sorting by
// probability (then depth) keeps every parent ahead of its children.
Draft merge_trees(const std::vector<std::tuple<std::vector<int32_t>, std::vector<int32_t>, std::vector<double>>>& trees,
                  const std::vector<double>& scales, int budget) {
  struct Node {
    int32_t token;
    int32_t parent;
    int depth;
    double prob;
  };
  std::vector<Node> nodes;
  std::vector<std::pair<uint64_t, int32_t>> by_edge;  // (parent, token) -> node, small: linear scan is fine
  auto find_edge = [&](int32_t parent, int32_t token) -> int32_t {
    uint64_t k = (static_cast<uint64_t>(static_cast<uint32_t>(parent)) << 32) | static_cast<uint32_t>(token);
    for (const auto& e : by_edge)
      if (e.first == k) return e.second;
    return -1;
  };
  for (size_t t = 0; t < trees.size(); ++t) {
    const auto& [tokens, parents, probs] = trees[t];
    double scale = t < scales.size() ? scales[t] : 1.0;
    std::vector<int32_t> mapped(tokens.size(), -1);
    for (size_t i = 0; i < tokens.size(); ++i) {
      int32_t parent = parents[i] < 0 ? -1 : mapped[parents[i]];
      double p = std::min(1.0, (i < probs.size() ? probs[i] : 1.0) * scale);
      int32_t at = find_edge(parent, tokens[i]);
      if (at < 0) {
        at = static_cast<int32_t>(nodes.size());
        nodes.push_back({tokens[i], parent, parent < 0 ? 1 : nodes[parent].depth + 1, p});
        uint64_t k = (static_cast<uint64_t>(static_cast<uint32_t>(parent)) << 32) | static_cast<uint32_t>(tokens[i]);
        by_edge.push_back({k, at});
      } else {
        nodes[at].prob = std::max(nodes[at].prob, p);
      }
      mapped[i] = at;
    }
  }
  // Parents must not rank below children after the max: lift each parent to its best child.
  for (int32_t i = static_cast<int32_t>(nodes.size()) - 1; i >= 0; --i)
    if (nodes[i].parent >= 0) nodes[nodes[i].parent].prob = std::max(nodes[nodes[i].parent].prob, nodes[i].prob);
  std::vector<int32_t> order(nodes.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    if (nodes[a].prob != nodes[b].prob) return nodes[a].prob > nodes[b].prob;
    if (nodes[a].depth != nodes[b].depth) return nodes[a].depth < nodes[b].depth;
    return a < b;
  });
  Draft out;
  std::vector<int32_t> out_index(nodes.size(), -1);
  for (int32_t i : order) {
    if (static_cast<int>(out.tokens.size()) >= budget) break;
    int32_t parent = nodes[i].parent;
    if (parent >= 0 && out_index[parent] < 0) continue;  // its parent did not make the cut
    out_index[i] = static_cast<int32_t>(out.tokens.size());
    out.tokens.push_back(nodes[i].token);
    out.parents.push_back(parent < 0 ? -1 : out_index[parent]);
    out.probs.push_back(nodes[i].prob);
  }
  return out;
}

py::tuple to_python(const Draft& d) { return py::make_tuple(d.tokens, d.parents, d.probs, d.match_len); }

template <class T>
py::list list_of(const std::vector<T>& v, size_t n) {
  py::list out(n);
  for (size_t i = 0; i < n; ++i) out[i] = py::cast(v[i]);
  return out;
}

// One session of the suffix drafter: its own index, the scope's shared index of earlier
// responses and calibration it drafts with, and its last draft until the target's tokens come
// back. A step is then two calls from Python (propose, accept) with nothing to convert but the
// nodes sent and the tokens emitted.
class SuffixSession {
 public:
  TokenIndex index;

  SuffixSession() : index(kDefaultOrders) {}

  // The scope's shared state and the drafting parameters (the Python objects are kept alive here).
  void bind(py::object responses, py::object calibration, const DraftParams& params, py::object prior) {
    responses_ref_ = responses;
    calibration_ref_ = calibration;
    prior_ref_ = prior;
    responses_ = responses.is_none() ? nullptr : responses.cast<TokenIndex*>();
    prior_ = prior.is_none() ? nullptr : prior.cast<TokenIndex*>();
    calibration_ = calibration.is_none() ? nullptr : calibration.cast<Calibration*>();
    params_ = params;
    has_pending_ = has_offer_ = false;
  }

  // (tokens, parents, probs, match_len, left_out): the draft's nodes whose acceptance chance is at
  // least `min_chance` -- a prefix, since the tree is grown best first -- and how many were left out.
  // The calibration will judge the whole tree, sent or not.
  py::tuple propose(int budget, double min_chance) {
    has_pending_ = has_offer_ = false;  // until the new tree is whole
    Draft& d = pending_;  // its buffers are reused step after step
    ::propose(d, index, responses_, budget, params_, calibration_, prior_);
    size_t n = d.tokens.size(), k = 0;
    while (k < n && d.probs[k] >= min_chance) ++k;
    has_pending_ = calibration_ != nullptr && n > 0;
    has_offer_ = true;
    return py::make_tuple(list_of(d.tokens, k), list_of(d.parents, k), list_of(d.probs, k), d.match_len, n - k);
  }

  // (tokens, parents, probs, match_len) of the whole tree the last propose grew, nodes under its
  // min_chance included; None before any propose, and after accept, bind or forget_offer: a caller
  // that needs the nodes it was spared need not grow the tree again.
  py::object offered() const {
    if (!has_offer_) return py::none();
    size_t n = pending_.tokens.size();
    return py::make_tuple(list_of(pending_.tokens, n), list_of(pending_.parents, n), list_of(pending_.probs, n),
                          pending_.match_len);
  }

  // A step that drafted nothing (the caller's budget was spent): the last tree is no offer for it.
  // The calibration still judges that tree when the step's tokens come.
  void forget_offer() { has_offer_ = false; }

  // The tokens the target emitted after the last draft: the calibration learns from the draft, the
  // index takes the tokens.
  void accept(const std::vector<int32_t>& tokens) {
    has_offer_ = false;
    if (has_pending_) {
      calibration_->observe_draft(pending_, tokens);
      has_pending_ = false;
    }
    index.extend(tokens);
  }

 private:
  py::object responses_ref_, calibration_ref_, prior_ref_;
  const TokenIndex* responses_ = nullptr;
  const TokenIndex* prior_ = nullptr;
  Calibration* calibration_ = nullptr;
  DraftParams params_;
  Draft pending_;
  bool has_pending_ = false;  // the calibration has yet to judge pending_
  bool has_offer_ = false;    // pending_ is the tree of the last propose, nothing accepted since
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Compiled core of QuickDraft's suffix drafters (token index, draft-tree growth).";
  m.attr("BOUNDARY") = BOUNDARY;

  py::class_<DraftParams>(m, "DraftParams")
      .def(py::init<>())
      .def_readwrite("max_depth", &DraftParams::max_depth)
      .def_readwrite("factor", &DraftParams::factor)
      .def_readwrite("offset", &DraftParams::offset)
      .def_readwrite("min_prob", &DraftParams::min_prob)
      .def_readwrite("max_occurrences", &DraftParams::max_occurrences)
      .def_readwrite("max_match", &DraftParams::max_match)
      .def_readwrite("merge", &DraftParams::merge)
      .def_readwrite("length_decay", &DraftParams::length_decay)
      .def_readwrite("recency_decay", &DraftParams::recency_decay)
      .def_readwrite("shared_weight", &DraftParams::shared_weight)
      .def_readwrite("prior_weight", &DraftParams::prior_weight)
      .def_readwrite("prior_below", &DraftParams::prior_below)
      .def_readwrite("context_window", &DraftParams::context_window)
      .def_readwrite("context_weight", &DraftParams::context_weight)
      .def_readwrite("resync_weight", &DraftParams::resync_weight)
      .def_readwrite("resync_below", &DraftParams::resync_below)
      .def_readwrite("resync_min", &DraftParams::resync_min);

  py::class_<IndexSnapshot>(m, "IndexSnapshot")
      .def_readonly("start", &IndexSnapshot::start)
      .def_property_readonly("end", &IndexSnapshot::end)
      .def(
          "build",
          [](const IndexSnapshot& snap, bool freeze, double headroom) {
            // Seconds for millions of tokens: the caller's other threads (the proxy's event loop) go on.
            py::gil_scoped_release unlocked;
            return TokenIndex::build(snap, freeze, headroom);
          },
          py::arg("freeze") = true, py::arg("headroom") = 0.0,
          "A new index of the snapshot's tokens (frozen, unless asked not to), built without holding the GIL, "
          "with room to grow by `headroom` times its size before reallocating");

  py::class_<TokenIndex>(m, "TokenIndex")
      .def(py::init<std::vector<int>>(), py::arg("orders") = kDefaultOrders)
      .def("__len__", &TokenIndex::size)
      .def_property_readonly("floor", &TokenIndex::floor)
      .def_property_readonly("live_tokens", &TokenIndex::live_tokens)
      .def_property_readonly("tokens", [](const TokenIndex& t) { return t.tokens(); })
      .def("tail", [](const TokenIndex& t, int64_t n) {
        const auto& toks = t.tokens();
        int64_t start = std::max<int64_t>(0, static_cast<int64_t>(toks.size()) - n);
        return std::vector<int32_t>(toks.begin() + start, toks.end());
      })
      .def("since", [](const TokenIndex& t, int64_t start) {
        const auto& toks = t.tokens();
        start = std::clamp<int64_t>(start, 0, static_cast<int64_t>(toks.size()));
        return std::vector<int32_t>(toks.begin() + start, toks.end());
      })
      .def("rebase", &TokenIndex::rebase)
      .def("start_sequence", &TokenIndex::start_sequence)
      .def("extend", &TokenIndex::extend)
      .def(
          "extend_sequences",
          [](TokenIndex& t, const py::iterable& texts, bool freeze) {
            // Copied while the GIL is held, indexed without it: a large text (a prior) takes a
            // good part of a second to index, and the proxy's event loop must not stall meanwhile.
            std::vector<std::vector<int32_t>> copies;
            for (const auto& item : texts) {
              py::buffer_info info = py::reinterpret_borrow<py::buffer>(item).request();
              if (info.ndim != 1 || info.itemsize != 4 || (info.format != "i" && info.format != "l"))
                throw py::value_error("extend_sequences takes 1-D buffers of 32-bit ints, e.g. array('i')");
              const auto* first = static_cast<const int32_t*>(info.ptr);
              copies.emplace_back(first, first + info.shape[0]);
            }
            py::gil_scoped_release unlocked;
            for (const auto& c : copies) {
              t.start_sequence();
              t.extend(c);
            }
            if (freeze) t.freeze();
          },
          py::arg("texts"), py::arg("freeze") = false,
          "start_sequence() and extend() for each buffer of token ids (then freeze(), if asked), without "
          "holding the GIL: only for an index no other thread reads yet")
      .def("freeze", &TokenIndex::freeze,
           "Lay the chains of every position indexed so far out as contiguous blocks (faster queries; "
           "truncating into that part rebuilds its chains)")
      .def_property_readonly("frozen_tokens", &TokenIndex::frozen_tokens)
      .def("truncate", &TokenIndex::truncate)
      .def("evict_before", &TokenIndex::evict_before)
      .def_readwrite("auto_compact", &TokenIndex::auto_compact,
                     "evict_before compacts the arena when half of it is dead (False: the caller rebuilds it "
                     "from snapshot() instead)")
      .def_property_readonly("compaction_due", &TokenIndex::compaction_due)
      .def("compact", &TokenIndex::compact, "Drop the evicted part of the arena now (indexes the rest again)")
      .def("snapshot", &TokenIndex::snapshot,
           "A copy of what a compaction would keep, to rebuild elsewhere (IndexSnapshot.build) while this "
           "index goes on")
      .def("catch_up", &TokenIndex::catch_up, py::arg("source"), py::arg("snapshot"), py::arg("limit") = -1,
           "Built from `snapshot` of `source`: take the tokens `source` gained since (at most `limit` a "
           "call; negative: all), then its floor; True once level with it")
      .def("memory_bytes", &TokenIndex::memory_bytes)
      .def(
          "occurrences",
          [](const TokenIndex& t, const std::vector<int32_t>& ctx, int max_occ, int64_t exclude_end, int max_match,
             bool all_orders) {
            std::vector<std::pair<int32_t, int32_t>> out;
            for (const auto& o : t.occurrences(ctx.data(), static_cast<int64_t>(ctx.size()), max_occ, exclude_end,
                                               max_match, all_orders))
              out.emplace_back(o.end, o.match_len);
            return out;
          },
          py::arg("context"), py::arg("max_occurrences"), py::arg("exclude_end") = -1, py::arg("max_match") = 32,
          py::arg("all_orders") = false)
      .def("continuation", [](const TokenIndex& t, int64_t end, int depth) {
        std::vector<int32_t> out;
        for (int64_t pos = end + 1; pos < t.size() && static_cast<int>(out.size()) < depth; ++pos) {
          if (t.at(pos) == BOUNDARY) break;
          out.push_back(t.at(pos));
        }
        return out;
      });

  m.def(
      "merge_trees",
      [](const std::vector<std::tuple<std::vector<int32_t>, std::vector<int32_t>, std::vector<double>>>& trees,
         const std::vector<double>& scales, int budget) { return to_python(merge_trees(trees, scales, budget)); },
      py::arg("trees"), py::arg("scales"), py::arg("budget"),
      "Union of draft trees (tokens, parents, probs), best `budget` nodes by scaled probability.");

  py::class_<qd::NgramTable>(m, "NgramTable")
      .def(py::init<int, int, int64_t>(), py::arg("max_order") = 4, py::arg("width") = 8,
           py::arg("max_entries") = 2'000'000)
      .def_property_readonly("entries", &qd::NgramTable::entries)
      .def("memory_bytes", &qd::NgramTable::memory_bytes)
      .def_property_readonly("max_order", &qd::NgramTable::max_order)
      .def("observe_run", &qd::NgramTable::observe_run, py::arg("context"), py::arg("run"), py::arg("top_ids"),
           py::arg("mass"), py::arg("k"), py::arg("forget") = 1.0f,
           "Learn tokens that followed `context` (with the target's top-k masses when k > 0).")
      .def("feedback",
           [](qd::NgramTable& t, const std::vector<int32_t>& ctx, int32_t token, bool accepted) {
             t.feedback(ctx.data(), static_cast<int64_t>(ctx.size()), token, accepted);
           })
      .def("distribution",
           [](const qd::NgramTable& t, const std::vector<int32_t>& ctx) {
             std::vector<std::pair<int32_t, float>> out;
             const qd::NgramEntry* e = t.longest(ctx.data(), static_cast<int64_t>(ctx.size()));
             if (e != nullptr)
               for (const auto& nt : e->next) out.emplace_back(nt.token, nt.mass / e->total);
             return out;
           })
      .def(
          "draft_stand",
          [](const qd::NgramTable& t, const std::vector<int32_t>& ctx, int budget, int max_depth, double min_prob,
             int branch, double temperature, uint64_t seed) {
            auto out = t.grow(ctx.data(), static_cast<int64_t>(ctx.size()), budget, max_depth, min_prob, branch,
                              temperature, seed,
                              [](const qd::NgramEntry&, const qd::NextToken& nt) { return double(nt.mass); });
            return py::make_tuple(out.tokens, out.parents, out.probs);
          },
          "Draft tree from target-probability n-grams; temperature > 0 samples children with Gumbel-top-k.")
      .def(
          "draft_aded",
          [](const qd::NgramTable& t, const std::vector<int32_t>& ctx, int budget, int max_depth, double min_prob,
             int branch, double explore) {
            auto score = [explore](const qd::NgramEntry& e, const qd::NextToken& nt) {
              double tried = 0;
              for (const auto& o : e.next) tried += o.drafted;
              double rate = (nt.accepted + 1.0) / (nt.drafted + 2.0);
              double bonus = explore * std::sqrt(std::log(tried + 2.0) / (nt.drafted + 1.0));
              return double(nt.mass) * (rate + bonus);
            };
            auto out = t.grow(ctx.data(), static_cast<int64_t>(ctx.size()), budget, max_depth, min_prob, branch,
                              0.0, 0, score);
            return py::make_tuple(out.tokens, out.parents, out.probs);
          },
          "Draft tree from the adaptive tri-gram matrix, scored by acceptance with an exploration bonus (UCB).");

  py::class_<Calibration>(m, "Calibration",
                          "Acceptance chances of draft nodes by depth, raw probability, context match and support, "
                          "corrected by the node's token, the pair it completes and its siblings; learned from "
                          "what the target emitted (one per tenant and tokenizer).")
      .def(py::init<>())
      .def("estimate", &Calibration::estimate, py::arg("depth"), py::arg("raw"), py::arg("match_len"),
           py::arg("kind") = 0)
      .def("observe", &Calibration::observe, py::arg("depth"), py::arg("raw"), py::arg("match_len"), py::arg("kind"),
           py::arg("accepted"))
      .def("observe_draft", &Calibration::observe_draft, py::arg("proposal"), py::arg("emitted"),
           "Learn from a proposal and the tokens the target emitted after it (accepted ones and the bonus).")
      .def_property_readonly("observed", &Calibration::observed)
      .def("dump", &Calibration::dump, "The learned counts as bytes.")
      .def("load", &Calibration::load, py::arg("data"),
           "Replace the counts by a dump's; False (nothing changed) if the bytes are not a dump of this layout.");

  py::class_<Draft>(m, "Proposal", "A draft tree grown by the core, with what its calibration needs to learn.")
      .def_readonly("tokens", &Draft::tokens)
      .def_readonly("parents", &Draft::parents)
      .def_readonly("probs", &Draft::probs)
      .def_readonly("raws", &Draft::raws)
      .def_readonly("depths", &Draft::depths)
      .def_readonly("match_len", &Draft::match_len)
      .def("__len__", [](const Draft& d) { return d.tokens.size(); });

  py::class_<SuffixSession>(m, "SuffixSession",
                            "A suffix-drafter session: its index, its scope's shared state and its pending draft.")
      .def(py::init<>())
      .def_property_readonly(
          "index", [](SuffixSession& s) -> TokenIndex& { return s.index; }, py::return_value_policy::reference_internal)
      .def("bind", &SuffixSession::bind, py::arg("responses").none(true), py::arg("calibration").none(true),
           py::arg("params"), py::arg("prior").none(true) = py::none(),
           "Draft with this scope's response index and calibration (either may be None), and a prior index of "
           "public text (None: none).")
      .def("propose", &SuffixSession::propose, py::arg("budget"), py::arg("min_chance") = 0.0,
           "(tokens, parents, probs, match_len, left_out): the draft's nodes with a chance of at least min_chance.")
      .def("offered", &SuffixSession::offered,
           "(tokens, parents, probs, match_len) of the last propose's whole tree; None before any propose and after "
           "accept, bind or forget_offer.")
      .def("forget_offer", &SuffixSession::forget_offer, "A step that drafted nothing: offered() is None until the "
           "next propose.")
      .def("accept", &SuffixSession::accept, py::arg("tokens"),
           "Tokens the target emitted: the calibration learns from the pending draft, the index takes them.");

  m.def(
      "propose",
      [](const TokenIndex& session, const TokenIndex* shared, int budget, const DraftParams& p,
         const Calibration* calibration, const TokenIndex* prior) {
        Draft d;
        propose(d, session, shared, budget, p, calibration, prior);
        return d;
      },
      py::arg("session"), py::arg("shared").none(true), py::arg("budget"), py::arg("params"),
      py::arg("calibration").none(true) = nullptr, py::arg("prior").none(true) = nullptr,
      "Draft tree continuing the session's tokens, grown by calibrated acceptance chance when a calibration is "
      "given.");
}
