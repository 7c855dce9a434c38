// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ISwarmRegistry} from "./ISwarmRegistry.sol";

/// @title SwarmTraining: the rounds and merge-leader election of one swarm training.
/// @notice One deployment per training, by the admin of the consortium's `SwarmRegistry`, which
/// it names: the registry says who is enrolled and who is revoked; this contract holds the
/// training's spec hash and settings, the sites that joined it, its rounds, the leader draw, the
/// sites' liveness, the final round and the metrics. Sites check in per round; the contract
/// elects a merge leader among them; the leader commits the merged model's digest. Only metadata
/// and digests go on chain. Every step emits an event: the chain holds the training's audit log.
/// A site whose process died stays joined; once it missed ABSENT_AFTER_ROUNDS rounds any site may
/// mark it absent (a leader that let its deadline pass is marked at once; a site revoked in the
/// registry at any time), and no round waits for it any more. Checking in again brings it back.
/// Metrics ride on the next check-in (or `finish`), for the round the sender last took part in;
/// a site that trains with differential privacy adds its privacy spent (`PrivacyReported`).
/// @dev Gas layout: the global counters and those of the open round share one slot (`_s`); a
/// site's flags, last-seen time and rounds share one slot; the current and the previous round
/// live in a ring of two slots, each participant of them in a ring slot (address | weight),
/// written over from round to round (never a fresh slot after a site joined); only a round's
/// digest gets a slot of its own. Rounds before the previous one: status and digest here,
/// leader and participants in the events. Reverts are custom errors with typed arguments.
contract SwarmTraining {
    enum RoundStatus {
        Open, // accepting check-ins, no leader yet
        Elected, // leader drawn, merge not committed yet
        Committed, // merged digest recorded
        Abandoned // every participant failed as leader; the swarm moved on
    }

    /// A site's state in this training, in one slot (read and written whole).
    struct Member {
        uint40 lastSeen; // timestamp of the site's last state-changing call
        uint32 lastCheckinRound; // the last round the site checked in for
        uint32 failedRound; // the round in which it last failed as leader
        uint32 joinedRound; // the current round when it joined
        uint16 index; // position in _memberList
        bool joined;
        bool revoked; // revoked in the registry, and set aside here
        bool finished;
        bool absent; // marked absent (stopped taking part); a check-in clears it
    }

    struct Round {
        address leader; // 0 until pinned
        uint16 attempt; // 1 for the first election, +1 per re-election
        uint16 count; // participants, fixed at election
        uint32 electedAt;
        uint32 firstCheckinAt;
    }

    struct State {
        uint32 currentRound;
        uint32 finalRound; // 0 = not fixed yet
        uint16 activeCount; // joined, not revoked, not finished, not absent
        uint16 liveCount; // joined, not revoked (absent ones included)
        uint16 absentCount; // joined, not revoked, absent
        uint16 openCount; // participants of the open (current, unelected) round
        uint16 openActive; // ... of which active
        uint32 openFirstAt; // first check-in time of the open round
        bool elected; // the current round's participants are fixed and its leader is drawn
        bool finished; // the final round is committed
        uint32 drawBlock; // the block whose hash draws the current round's leader; 0: pinned
    }

    /// A site may be marked absent once the current round is this many rounds past the later of
    /// its last check-in and the round it joined in.
    uint32 public constant ABSENT_AFTER_ROUNDS = 2;
    uint256 internal constant FLAG_ENROLLED = 2;
    uint256 internal constant FLAG_REVOKED = 4;

    ISwarmRegistry public immutable registry;
    bytes32 public immutable specHash;
    uint32 public immutable minPeers;
    uint32 public immutable graceSeconds;
    uint32 public immutable roundDeadline;
    address public immutable admin;
    /// @notice The largest weight a site may check in with (the spec's max_weight).
    uint96 public immutable maxWeight;
    /// @notice The block this contract was deployed in: its event log starts there.
    uint256 public immutable deployedBlock;
    /// @notice The spec's secure_aggregation: a site joins with its registry key (snapshot).
    bool public immutable secureAggregation;

    State private _s;
    address[] private _memberList;
    mapping(address => Member) private _member;
    mapping(address => string) private _endpoint; // per-training endpoint (empty: the registry's)
    Round[2] private _ring; // round r lives in _ring[r & 1] from its election on
    mapping(uint256 => uint256) private _entries; // (i << 1 | r & 1) -> address | weight << 160
    bytes32[2] private _ringDigest; // the merged digest of round r in _ringDigest[r & 1]
    mapping(uint256 => uint256) private _abandonedBits; // bit r & 255 of word r >> 8
    mapping(address => bytes32) private _maskKey; // secure aggregation: the key at join

    event SpecPublished(bytes32 indexed specHash, string specJson);
    event Joined(address indexed node, string endpoint);
    event EndpointUpdated(address indexed node, string endpoint);
    event CheckedIn(uint256 indexed round, address indexed node, uint256 weight);
    /// The round's participants (attempt 1) or candidates (re-election) are fixed; its leader is
    /// drawn from the hash of block `drawBlock` (this transaction's block), known once it is mined.
    event RoundClosed(
        uint256 indexed round, uint256 attempt, uint256 participantCount, uint256 drawBlock
    );
    event LeaderElected(
        uint256 indexed round, address indexed leader, uint256 attempt, uint256 participantCount
    );
    event LeaderFailed(uint256 indexed round, address indexed leader);
    event RoundAbandoned(uint256 indexed round);
    event MergeCommitted(
        uint256 indexed round, address indexed leader, bytes32 digest, address[] members
    );
    event NodeFinished(address indexed node);
    event NodeAbsent(address indexed node, uint256 lastCheckinRound);
    event NodeReturned(address indexed node);
    event NodeRevoked(address indexed node);
    event FinalRound(uint256 indexed round);
    event TrainingFinished(uint256 indexed round, bytes32 digest);
    event MetricsReported(uint256 indexed round, address indexed node, int256 loss, int256 metric);
    /// A DP site's privacy spent so far, reported with its metrics of `round`: epsilon x1e6
    /// (2^128-1: infinite, no noise) at delta x1e18. An event of its own, emitted only for a DP
    /// site: a plain site's report costs one zero calldata word more, MetricsReported is as before.
    event PrivacyReported(uint256 indexed round, address indexed node, uint256 epsilonE6,
        uint256 deltaE18);
    /// Secure aggregation: the SHA-256 of the masked update `node` checked in with for `round`
    /// (swarmnode.privacy.wire). An event, not a slot: the leader and any auditor read it from
    /// the log, nothing on chain needs it, and a plain training pays no storage for it.
    event MaskedUpdate(uint256 indexed round, address indexed node, bytes32 hash);

    error SpecHashMismatch(bytes32 given, bytes32 actual);
    error ZeroSetting(uint8 which); // 0 minPeers, 1 roundDeadline, 2 maxWeight
    error NotRegistryAdmin(address caller, address admin);
    error TrainingOver(uint256 finalRound);
    error NotEnrolled(address node);
    error Revoked(address node);
    error NotJoined(address node);
    error AlreadyJoined(address node);
    error JoinClosed(uint256 finalRound);
    error TrainingFull(uint256 members);
    error EmptyEndpoint();
    error RoundZero();
    error RoundNotOpen(uint256 round, uint256 currentRound);
    error RoundAlreadyElected(uint256 round, address leader);
    error AlreadyCheckedIn(address node, uint256 round);
    error WeightOverMax(uint256 weight, uint256 maxWeight);
    error TooFewCheckedIn(uint256 round, uint256 checkedIn, uint256 minPeers);
    error GraceNotOver(uint256 round, uint256 readyAt, uint256 now_);
    error RoundNotElected(uint256 round, RoundStatus status);
    error LeaderNotDrawn(uint256 round, uint256 drawBlock);
    error LeaderAlreadyDrawn(uint256 round, address leader);
    error NotLeader(uint256 round, address leader, address caller);
    error ZeroDigest();
    error TooFewMembers(uint256 round, uint256 given, uint256 needed);
    error MemberNotCheckedIn(uint256 round, address member);
    error MemberRevoked(uint256 round, address member);
    error MemberListedTwice(uint256 round, address member);
    error NotParticipant(uint256 round, address node);
    error DeadlineNotPassed(uint256 round, address leader, uint256 due, uint256 now_);
    error AlreadyFinished(address node);
    error FinishedNotAbsent(address node);
    error AlreadyAbsent(address node);
    error CheckedInCurrentRound(address node, uint256 round);
    error AbsentTooEarly(address node, uint256 fromRound, uint256 currentRound, uint256 silentUntil);
    error SeenRecently(address node, uint256 quietUntil, uint256 now_);
    error MetricsNotEligible(uint256 round, address node, uint256 lastCheckinRound);
    error RoundPruned(uint256 round, uint256 oldestKept);
    error NotRevoked(address node);
    error NotListed(address training);
    error NoMaskKey(address node);
    error LowOrderMaskKey(address node, bytes32 key);
    error BadPrivacy(uint256 epsilonE6, uint256 deltaE18);

    constructor(
        ISwarmRegistry registry_,
        bytes32 specHash_,
        string memory specJson,
        uint32 minPeers_,
        uint32 graceSeconds_,
        uint32 roundDeadlineSeconds_,
        uint96 maxWeight_,
        bool secureAggregation_
    ) {
        bytes32 actual = sha256(bytes(specJson));
        if (actual != specHash_) revert SpecHashMismatch(specHash_, actual);
        if (minPeers_ < 1) revert ZeroSetting(0);
        if (roundDeadlineSeconds_ < 1) revert ZeroSetting(1);
        if (maxWeight_ < 1) revert ZeroSetting(2);
        address regAdmin = registry_.admin();
        if (msg.sender != regAdmin) revert NotRegistryAdmin(msg.sender, regAdmin);
        registry = registry_;
        maxWeight = maxWeight_;
        secureAggregation = secureAggregation_;
        deployedBlock = block.number;
        specHash = specHash_;
        minPeers = minPeers_;
        graceSeconds = graceSeconds_;
        roundDeadline = roundDeadlineSeconds_;
        admin = msg.sender;
        _s.currentRound = 1;
        // the round ring is written over from round to round, never from zero (cheaper)
        _ring[0].firstCheckinAt = 1;
        _ring[1].firstCheckinAt = 1;
        _ringDigest[0] = bytes32(uint256(1));
        _ringDigest[1] = bytes32(uint256(1));
        emit SpecPublished(specHash_, specJson);
    }

    // ------------------------------------------------------------------ sites

    /// @notice Join this training: the calling site must be enrolled (and not revoked) in the
    /// registry. `endpoint` (host:port) overrides the registry's for this training; empty: none.
    /// With secure aggregation the site's registry key is copied here (`maskKeyOf`): its pair
    /// keys stay those of the join however the registry's slot changes later; no key, or a
    /// low-order X25519 point (no pair key can be made with it): refused.
    function join(string calldata endpoint) external {
        State memory s = _s;
        if (s.finished) revert TrainingOver(s.finalRound);
        uint256 flags = registry.siteFlags(msg.sender);
        if (flags & FLAG_REVOKED != 0) revert Revoked(msg.sender);
        if (flags & FLAG_ENROLLED == 0) revert NotEnrolled(msg.sender);
        // only a training the registry lists: its revoke reaches every training a site is in
        if (!registry.isTraining(address(this))) revert NotListed(address(this));
        Member memory m = _member[msg.sender];
        if (m.joined) revert AlreadyJoined(msg.sender);
        if (s.finalRound != 0) revert JoinClosed(s.finalRound);
        uint256 k = _memberList.length;
        if (k >= type(uint16).max) revert TrainingFull(k);
        m.index = uint16(k);
        m.joined = true;
        m.joinedRound = s.currentRound;
        m.lastSeen = uint40(block.timestamp);
        _member[msg.sender] = m;
        _memberList.push(msg.sender);
        if (bytes(endpoint).length != 0) _endpoint[msg.sender] = endpoint;
        if (secureAggregation) {
            (,,,,,, bytes32 key) = registry.siteInfo(msg.sender);
            if (key == 0) revert NoMaskKey(msg.sender);
            if (_lowOrderKey(key)) revert LowOrderMaskKey(msg.sender, key);
            _maskKey[msg.sender] = key;
        }
        // the participant slots this site will ever need: written over, never from zero
        _entries[k << 1] = 1;
        _entries[(k << 1) | 1] = 1;
        s.activeCount++;
        s.liveCount++;
        _s = s;
        emit Joined(msg.sender, endpoint);
    }

    /// @notice Set the calling site's endpoint for this training (a restart on a new port).
    function updateEndpoint(string calldata endpoint) external {
        _notFinished();
        Member memory m = _live(msg.sender);
        if (bytes(endpoint).length == 0) revert EmptyEndpoint();
        _endpoint[msg.sender] = endpoint;
        m.lastSeen = uint40(block.timestamp);
        _member[msg.sender] = m;
        emit EndpointUpdated(msg.sender, endpoint);
    }

    /// @notice Check in for the open round with the site's merge weight; elects the leader when
    /// this check-in completes the set of required sites. An absent site returns with it.
    /// `metricsRound` (0: none) with `loss` and `metric` (fixed point x1e6) records the site's
    /// evaluation of that round's merged model: only the round it last checked in for, and only
    /// if that round was committed. `privacy` (0: the site is not DP) rides with those metrics:
    /// epsilon x1e6 in the low 128 bits, delta x1e18 (0 < delta < 1) in the high 128 bits
    /// (logged as PrivacyReported). `maskedHash` (0: none): with secure aggregation, the hash
    /// of the masked update the site will push for this round (logged as MaskedUpdate).
    function checkin(
        uint256 round,
        uint256 weight,
        uint256 metricsRound,
        int256 loss,
        int256 metric,
        uint256 privacy,
        bytes32 maskedHash
    ) external {
        State memory s = _s;
        if (s.finished) revert TrainingOver(s.finalRound);
        Member memory m = _live(msg.sender);
        if (round != s.currentRound) revert RoundNotOpen(round, s.currentRound);
        if (s.elected) revert RoundAlreadyElected(round, _leaderOf(s, _ring[round & 1], round));
        if (m.lastCheckinRound == round) revert AlreadyCheckedIn(msg.sender, round);
        if (weight > maxWeight) revert WeightOverMax(weight, maxWeight);
        if (metricsRound != 0) _metrics(m, metricsRound, loss, metric, privacy);
        if (m.absent) _return(msg.sender, m, s);
        m.lastCheckinRound = uint32(round);
        m.lastSeen = uint40(block.timestamp);
        _member[msg.sender] = m;
        if (s.openCount == 0) s.openFirstAt = uint32(block.timestamp);
        _entries[(uint256(s.openCount) << 1) | (round & 1)] =
            uint256(uint160(msg.sender)) | (weight << 160);
        s.openCount++;
        if (!m.finished) s.openActive++;
        emit CheckedIn(round, msg.sender, weight);
        if (maskedHash != 0) emit MaskedUpdate(round, msg.sender, maskedHash);
        if (_allRequired(s, round)) _elect(s, round);
        else _s = s;
    }

    /// @notice Elect the leader of the open round once `minPeers` checked in and the grace
    /// period after the first check-in has passed. Any joined site may call it.
    function elect(uint256 round) external {
        State memory s = _s;
        if (s.finished) revert TrainingOver(s.finalRound);
        _live(msg.sender);
        if (round != s.currentRound) revert RoundNotOpen(round, s.currentRound);
        if (s.elected) revert RoundAlreadyElected(round, _leaderOf(s, _ring[round & 1], round));
        if (s.openCount < minPeers) revert TooFewCheckedIn(round, s.openCount, minPeers);
        uint256 ready = uint256(s.openFirstAt) + graceSeconds;
        if (block.timestamp < ready) revert GraceNotOver(round, ready, block.timestamp);
        _elect(s, round);
    }

    /// @notice The round's leader records the merged model's digest and the members merged.
    function commitMerge(uint256 round, bytes32 digest, address[] calldata members) external {
        State memory s = _s;
        if (s.finished) revert TrainingOver(s.finalRound);
        RoundStatus st = _status(s, round);
        if (st != RoundStatus.Elected) revert RoundNotElected(round, st);
        Round storage rd = _ring[round & 1];
        address leader = _pin(s, rd, round);
        if (leader == address(0)) revert LeaderNotDrawn(round, s.drawBlock);
        if (msg.sender != leader) revert NotLeader(round, leader, msg.sender);
        _live(msg.sender);
        if (digest == 0) revert ZeroDigest();
        uint256 mlen = members.length;
        uint256 count = rd.count;
        uint256 need = minPeers < count ? minPeers : count;
        if (mlen == 0 || mlen < need) revert TooFewMembers(round, mlen, need);
        _checkMembers(round, members);
        _ringDigest[round & 1] = digest;
        s.currentRound = uint32(round + 1);
        s.elected = false;
        emit MergeCommitted(round, msg.sender, digest, members);
        if (round == s.finalRound) {
            s.finished = true;
            emit TrainingFinished(round, digest);
        }
        _s = s;
    }

    /// @notice After the round deadline, a participant replaces a leader that did not commit; the
    /// failed leader is marked absent unless it finished or is the last live site not set aside.
    function reelect(uint256 round) external {
        State memory s = _s;
        if (s.finished) revert TrainingOver(s.finalRound);
        Member memory caller = _live(msg.sender);
        RoundStatus st = _status(s, round);
        if (st != RoundStatus.Elected) revert RoundNotElected(round, st);
        if (caller.lastCheckinRound != round) revert NotParticipant(round, msg.sender);
        Round storage rd = _ring[round & 1];
        uint256 due = uint256(rd.electedAt) + roundDeadline;
        if (block.timestamp < due) {
            revert DeadlineNotPassed(round, _leaderOf(s, rd, round), due, block.timestamp);
        }
        caller.lastSeen = uint40(block.timestamp); // a site that re-elects is not silent
        _member[msg.sender] = caller;
        address old = _pin(s, rd, round);
        if (old == address(0)) {
            // the draw block's hash is gone (over 256 blocks without a transaction for this
            // round): nobody failed yet; draw again from this block
            if (block.number <= s.drawBlock) revert LeaderNotDrawn(round, s.drawBlock);
            _close(s, rd, round, rd.attempt, rd.count);
            return;
        }
        Member memory on = _member[old];
        on.failedRound = uint32(round);
        emit LeaderFailed(round, old);
        // it evidently stopped answering: no later round waits for it (a check-in brings it
        // back), unless it is the last live site not set aside: then the swarm waits for it (a
        // chain stall fails every leader of a round; that must not end or empty the training)
        bool gone = on.joined && !on.revoked && !on.finished && !on.absent
            && s.liveCount > s.absentCount + 1;
        if (gone) _absent(old, on, s);
        _member[old] = on;
        if (gone && s.activeCount == 0 && s.finalRound == 0) _fixFinal(s, false);

        uint256 n = rd.count;
        (, uint256 k) = _candidates(round, n);
        if (k == 0) {
            rd.leader = address(0);
            _abandonedBits[round >> 8] |= 1 << (round & 255);
            emit RoundAbandoned(round);
            s.currentRound = uint32(round + 1);
            s.elected = false;
            if (round == s.finalRound) {
                s.finalRound = uint32(round + 1);
                emit FinalRound(round + 1);
            }
            _s = s;
            return;
        }
        _close(s, rd, round, rd.attempt + 1, n);
    }

    /// @notice Pin the current round's leader once the hash of its draw block is known (any later
    /// block). Nodes read the drawn leader from `roundInfo` without it; this records it (and emits
    /// LeaderElected) for chains whose next block only comes with a transaction. Anyone may
    /// call it: the leader it pins is fixed by the draw block's hash, not by the caller.
    function draw(uint256 round) external {
        State memory s = _s;
        if (s.finished) revert TrainingOver(s.finalRound);
        RoundStatus st = _status(s, round);
        if (st != RoundStatus.Elected) revert RoundNotElected(round, st);
        Round storage rd = _ring[round & 1];
        if (rd.leader != address(0)) revert LeaderAlreadyDrawn(round, rd.leader);
        if (block.number <= s.drawBlock) revert LeaderNotDrawn(round, s.drawBlock);
        if (_pin(s, rd, round) == address(0)) _close(s, rd, round, rd.attempt, rd.count);
        else _s = s;
    }

    /// @notice The calling site's trainer is done; `metricsRound`, `loss`, `metric`, `privacy` as
    /// in `checkin`. When no active site is left the final round is fixed; every live site then
    /// takes part in it.
    function finish(uint256 metricsRound, int256 loss, int256 metric, uint256 privacy) external {
        State memory s = _s;
        if (s.finished) revert TrainingOver(s.finalRound);
        Member memory m = _live(msg.sender);
        if (m.finished) revert AlreadyFinished(msg.sender);
        if (metricsRound != 0) _metrics(m, metricsRound, loss, metric, privacy);
        if (m.absent) _return(msg.sender, m, s);
        m.finished = true;
        m.lastSeen = uint40(block.timestamp);
        _member[msg.sender] = m;
        s.activeCount--;
        uint256 cur = s.currentRound;
        bool open = !s.elected;
        if (open && m.lastCheckinRound == cur) s.openActive--;
        emit NodeFinished(msg.sender);
        if (s.activeCount == 0 && s.finalRound == 0) _fixFinal(s, open);
        if (open && _allRequired(s, cur)) _elect(s, cur);
        else _s = s;
    }

    /// @notice The site's evaluation of the final model: no check-in follows the final round, so
    /// this is the one report with a transaction of its own. Only once the training finished,
    /// by a site that took part in the final round. `privacy` as in `checkin`.
    function reportFinalMetrics(int256 loss, int256 metric, uint256 privacy) external {
        State memory s = _s;
        if (!s.finished) revert MetricsNotEligible(s.finalRound, msg.sender, 0);
        Member memory m = _member[msg.sender];
        if (!m.joined) revert NotJoined(msg.sender);
        // expel does nothing once the training finished: ask the registry
        if (m.revoked || registry.siteFlags(msg.sender) & FLAG_REVOKED != 0) {
            revert Revoked(msg.sender);
        }
        _metrics(m, s.finalRound, loss, metric, privacy);
    }

    /// @notice Set `node` aside: revoked in the registry (at once, for good), or it missed the
    /// last ABSENT_AFTER_ROUNDS rounds and was silent for a round deadline, or it was silent for
    /// ABSENT_AFTER_ROUNDS + 1 deadlines (its process evidently died). It leaves the active sites,
    /// so neither the open rounds nor the final round wait for it; if every other site finished,
    /// the final round is fixed. An absent site comes back by checking in. Any joined site.
    function markAbsent(address node) external {
        State memory s = _s;
        if (s.finished) revert TrainingOver(s.finalRound);
        _live(msg.sender);
        Member memory n = _member[node];
        if (n.revoked) revert Revoked(node);
        if (!n.joined) revert NotJoined(node);
        if (registry.siteFlags(node) & FLAG_REVOKED != 0) {
            _expel(node, n, s);
            return;
        }
        if (n.finished) revert FinishedNotAbsent(node);
        if (n.absent) revert AlreadyAbsent(node);
        uint256 cur = s.currentRound;
        if (n.lastCheckinRound == cur) revert CheckedInCurrentRound(node, cur);
        (bool ok, uint256 from, uint256 silentUntil, uint256 quietUntil) = _absentRule(n, cur);
        if (!ok) {
            if (cur < from && block.timestamp < silentUntil) {
                revert AbsentTooEarly(node, from, cur, silentUntil);
            }
            revert SeenRecently(node, quietUntil, block.timestamp);
        }
        _absent(node, n, s);
        _member[node] = n;
        bool open = !s.elected;
        if (s.activeCount == 0 && s.finalRound == 0) _fixFinal(s, open);
        if (open && _allRequired(s, cur)) _elect(s, cur);
        else _s = s;
    }

    /// @notice The registry revoked `node`: it leaves this training for good. Called by the
    /// registry in the revoking transaction; anyone may call it for a site the registry shows
    /// revoked (a training the registry does not list). Does nothing for a site that is not
    /// joined, already set aside, or once the training finished.
    function expel(address node) external {
        State memory s = _s;
        Member memory n = _member[node];
        if (s.finished || !n.joined || n.revoked) return;
        if (msg.sender != address(registry) && registry.siteFlags(node) & FLAG_REVOKED == 0) {
            revert NotRevoked(node);
        }
        _expel(node, n, s);
    }

    // ------------------------------------------------------------------ views for the nodes

    /// @notice The sites `markAbsent` would accept now (revoked in the registry, or absent by
    /// the rounds-and-silence rule), in joining order; empty once the training finished.
    function absentCandidates() external view returns (address[] memory out) {
        State memory s = _s;
        uint256 len = _memberList.length;
        out = new address[](len);
        if (s.finished) {
            assembly { mstore(out, 0) }
            return out;
        }
        uint256 k;
        for (uint256 i = 0; i < len; i++) {
            address a = _memberList[i];
            Member memory n = _member[a];
            if (n.revoked) continue;
            bool take;
            if (registry.siteFlags(a) & FLAG_REVOKED != 0) {
                take = true;
            } else if (!n.finished && !n.absent && n.lastCheckinRound != s.currentRound) {
                (take,,,) = _absentRule(n, s.currentRound);
            }
            if (take) out[k++] = a;
        }
        assembly { mstore(out, k) }
    }

    /// @notice The sites the open round `round` still waits for before it elects by itself
    /// (every active site, or in the final round every live one not set aside), in joining
    /// order; empty when the round is not open.
    function waitingFor(uint256 round) external view returns (address[] memory out) {
        State memory s = _s;
        uint256 len = _memberList.length;
        out = new address[](len);
        uint256 k;
        if (!s.finished && round == s.currentRound && !s.elected) {
            bool fin = round == s.finalRound;
            for (uint256 i = 0; i < len; i++) {
                address a = _memberList[i];
                Member memory n = _member[a];
                if (n.revoked || n.absent || n.lastCheckinRound == round) continue;
                if (n.finished && !fin) continue;
                out[k++] = a;
            }
        }
        assembly { mstore(out, k) }
    }

    /// @notice Whether `elect(round)` would pass now (min peers in, grace over, still open).
    function electionDue(uint256 round) external view returns (bool) {
        State memory s = _s;
        return !s.finished && round == s.currentRound && !s.elected && s.openCount >= minPeers
            && block.timestamp >= uint256(s.openFirstAt) + graceSeconds;
    }

    /// @notice Whether the elected round's deadline has passed (a participant may `reelect`).
    function reelectDue(uint256 round) external view returns (bool) {
        State memory s = _s;
        if (s.finished || _status(s, round) != RoundStatus.Elected) return false;
        return block.timestamp >= uint256(_ring[round & 1].electedAt) + roundDeadline;
    }

    // ------------------------------------------------------------------ views

    function currentRound() external view returns (uint256) {
        return _s.currentRound;
    }

    function finalRound() external view returns (uint256) {
        return _s.finalRound;
    }

    function trainingFinished() external view returns (bool) {
        return _s.finished;
    }

    function activeCount() external view returns (uint256) {
        return _s.activeCount;
    }

    function absentCount() external view returns (uint256) {
        return _s.absentCount;
    }

    function nodeList() external view returns (address[] memory) {
        return _memberList;
    }

    /// @notice The site's peer endpoint for this training (its own, else the registry's).
    function endpointOf(address node) public view returns (string memory) {
        string memory e = _endpoint[node];
        return bytes(e).length != 0 ? e : registry.endpointOf(node);
    }

    /// @notice The secure-aggregation key `node` joined with (0: none, or a plain training).
    function maskKeyOf(address node) external view returns (bytes32) {
        return _maskKey[node];
    }

    function nodeInfo(address node)
        external
        view
        returns (
            string memory endpoint,
            bool joined,
            bool revoked,
            bool finished,
            uint256 lastSeen,
            bool absent,
            uint256 lastCheckinRound,
            uint256 joinedRound
        )
    {
        Member memory n = _member[node];
        bool gone = n.revoked || registry.siteFlags(node) & FLAG_REVOKED != 0;
        return (n.joined ? endpointOf(node) : "", n.joined, gone, n.finished, n.lastSeen,
            n.absent, n.lastCheckinRound, n.joinedRound);
    }

    /// @notice Round `round`. Rounds before the previous one hold only status and digest here:
    /// their leader is 0, their attempt and counts 0 (read them from the events).
    function roundInfo(uint256 round)
        external
        view
        returns (
            RoundStatus status,
            address leader,
            uint256 attempt,
            uint256 electedAt,
            uint256 firstCheckinAt,
            bytes32 digest,
            uint256 participantCount,
            bool isFinal
        )
    {
        if (round == 0) revert RoundZero();
        State memory s = _s;
        status = _status(s, round);
        digest = _digestOf(s, round);
        isFinal = s.finalRound != 0 && round == s.finalRound;
        if (round == s.currentRound && !s.elected) {
            (participantCount, firstCheckinAt) = (s.openCount, s.openFirstAt);
        } else if (round <= s.currentRound && round + 1 >= s.currentRound) {
            Round storage rd = _ring[round & 1];
            leader = _leaderOf(s, rd, round);
            (attempt, electedAt) = (rd.attempt, rd.electedAt);
            (participantCount, firstCheckinAt) = (rd.count, rd.firstCheckinAt);
        }
    }

    /// @notice The participants of `round` in check-in order (the current and the previous
    /// round only: older ones are in the CheckedIn events).
    function participants(uint256 round) public view returns (address[] memory out) {
        uint256 n = _participantCount(round);
        out = new address[](n);
        for (uint256 i = 0; i < n; i++) out[i] = address(uint160(_entry(round, i)));
    }

    function checkinWeight(uint256 round, address node)
        external
        view
        returns (bool checkedIn, uint256 weight)
    {
        uint256 n = _participantCount(round);
        for (uint256 i = 0; i < n; i++) {
            uint256 e = _entry(round, i);
            if (address(uint160(e)) == node) return (true, e >> 160);
        }
        return (false, 0);
    }

    // ------------------------------------------------------------------ internals

    /// Whether `key` (an X25519 public key: 32 bytes, u little-endian) is a point of order
    /// dividing 8 on Curve25519 or its twist, the set swarmnode.privacy.keys.usable_public
    /// rejects: X25519 ignores the top bit of the last byte (the lowest byte of the bytes32), so
    /// it is cleared first, and u is taken mod p = 2^255 - 19, so u = p and p + 1 (the only
    /// non-canonical encodings of a low-order u below 2^255) are in the set as well as
    /// 0, 1, p - 1 and the two points of order 8.
    function _lowOrderKey(bytes32 key) internal pure returns (bool) {
        bytes32 u = key & ~bytes32(uint256(0x80));
        return u == 0
            || u == 0x0100000000000000000000000000000000000000000000000000000000000000
            || u == 0xe0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800
            || u == 0x5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157
            || u == 0xecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f
            || u == 0xedffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f
            || u == 0xeeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f;
    }

    function _entry(uint256 round, uint256 i) internal view returns (uint256) {
        return _entries[(i << 1) | (round & 1)];
    }

    /// Participants of `round` held here: the current round's and the previous one's.
    function _participantCount(uint256 round) internal view returns (uint256) {
        if (round == 0) revert RoundZero();
        State memory s = _s;
        if (round > s.currentRound) return 0;
        if (round + 1 < s.currentRound) revert RoundPruned(round, s.currentRound - 1);
        if (round == s.currentRound && !s.elected) return s.openCount;
        return _ring[round & 1].count;
    }

    /// The rule of markAbsent for a live, unfinished site that did not check in for `cur`.
    function _absentRule(Member memory n, uint256 cur)
        internal
        view
        returns (bool ok, uint256 from, uint256 silentUntil, uint256 quietUntil)
    {
        uint256 since = n.lastCheckinRound > n.joinedRound ? n.lastCheckinRound : n.joinedRound;
        from = since + ABSENT_AFTER_ROUNDS;
        // silent for ABSENT_AFTER_ROUNDS + 1 deadlines is enough on its own: rounds stop moving
        // on when every other site finished and only waits for a dead one
        silentUntil = uint256(n.lastSeen) + uint256(roundDeadline) * (ABSENT_AFTER_ROUNDS + 1);
        // rounds alone are not enough: a live site slower than the grace period misses rounds
        // too; absent also means silent for longer than the round deadline
        quietUntil = uint256(n.lastSeen) + roundDeadline;
        ok = block.timestamp >= silentUntil || (cur >= from && block.timestamp >= quietUntil);
    }

    /// Emit the metrics of `round` for the site `m`: the round it last checked in for, committed;
    /// with its privacy (packed as in `checkin`) when it is a DP site.
    function _metrics(Member memory m, uint256 round, int256 loss, int256 metric, uint256 privacy)
        internal
    {
        if (round != m.lastCheckinRound || round >= _s.currentRound || _abandoned(round)) {
            revert MetricsNotEligible(round, msg.sender, m.lastCheckinRound);
        }
        emit MetricsReported(round, msg.sender, loss, metric);
        if (privacy != 0) {
            uint256 epsilonE6 = uint128(privacy);
            uint256 deltaE18 = privacy >> 128;
            if (deltaE18 == 0 || deltaE18 >= 1e18) revert BadPrivacy(epsilonE6, deltaE18);
            emit PrivacyReported(round, msg.sender, epsilonE6, deltaE18);
        }
    }

    /// Every site required for `round` has checked in: all active sites, or in the final round
    /// every live site that is not absent.
    function _allRequired(State memory s, uint256 round) internal view returns (bool) {
        if (s.openCount == 0) return false;
        if (round == s.finalRound) return s.openCount >= s.liveCount - s.absentCount;
        // min_peers holds here too: while fewer than minPeers sites joined, every one of them
        // checking in is not enough (finished sites still count as joined, so a swarm whose
        // other trainers are done can go on with its last active site).
        return s.activeCount != 0 && s.openActive >= s.activeCount && s.liveCount >= minPeers;
    }

    /// Close the open round `round`: its participants are fixed (in check-in order) and its
    /// leader is drawn from this block's hash, which no participant knows when it sends its
    /// transaction (a draw from the previous block's hash let the last site to check in wait for
    /// a block that made it leader).
    function _elect(State memory s, uint256 round) internal {
        uint256 n = s.openCount;
        Round storage rd = _ring[round & 1];
        rd.count = uint16(n);
        rd.firstCheckinAt = s.openFirstAt;
        s.openCount = 0;
        s.openActive = 0;
        s.openFirstAt = 0;
        s.elected = true;
        _close(s, rd, round, 1, n);
    }

    /// Start draw `attempt` of the elected round: the leader is unknown until this block is mined.
    function _close(State memory s, Round storage rd, uint256 round, uint256 attempt, uint256 n)
        internal
    {
        rd.leader = address(0);
        rd.attempt = uint16(attempt);
        rd.electedAt = uint32(block.timestamp);
        s.drawBlock = uint32(block.number);
        _s = s;
        emit RoundClosed(round, attempt, n, block.number);
    }

    /// The leader of `round`: pinned, or drawn from the draw block's hash once that is known
    /// (address 0 before, and if the hash is older than the 256 blocks the EVM keeps).
    function _leaderOf(State memory s, Round storage rd, uint256 round)
        internal
        view
        returns (address)
    {
        address pinned = rd.leader;
        if (pinned != address(0) || round != s.currentRound || !s.elected) return pinned;
        if (block.number <= s.drawBlock) return address(0);
        bytes32 h = blockhash(s.drawBlock);
        if (h == 0) return address(0);
        uint256 attempt = rd.attempt;
        uint256 seed = uint256(keccak256(abi.encodePacked(h, round, attempt)));
        uint256 n = rd.count;
        if (attempt == 1) return address(uint160(_entry(round, seed % n)));
        (address[] memory candidates, uint256 k) = _candidates(round, n);
        return k == 0 ? address(0) : candidates[seed % k];
    }

    /// Record the drawn leader of `round` (state `s`, written back by the caller) if it is not
    /// recorded yet; address 0 when it cannot be drawn now.
    function _pin(State memory s, Round storage rd, uint256 round) internal returns (address) {
        address leader = rd.leader;
        if (leader != address(0)) return leader;
        leader = _leaderOf(s, rd, round);
        if (leader == address(0)) return leader;
        rd.leader = leader;
        s.drawBlock = 0;
        emit LeaderElected(round, leader, rd.attempt, rd.count);
        return leader;
    }

    /// The participants of `round` that may still lead it (not failed in it, not revoked).
    function _candidates(uint256 round, uint256 n)
        internal
        view
        returns (address[] memory candidates, uint256 k)
    {
        candidates = new address[](n);
        for (uint256 i = 0; i < n; i++) {
            address p = address(uint160(_entry(round, i)));
            Member memory pn = _member[p];
            if (pn.failedRound != round && !pn.revoked) candidates[k++] = p;
        }
    }

    /// Every member checked in for `round` (the current round), is not revoked, and is listed once.
    function _checkMembers(uint256 round, address[] calldata members) internal view {
        uint256 mlen = members.length;
        uint256 seen; // bitmap of member indexes < 256; higher indexes are checked pairwise
        for (uint256 i = 0; i < mlen; i++) {
            address a = members[i];
            Member memory mn = _member[a];
            if (mn.lastCheckinRound != round || !mn.joined) revert MemberNotCheckedIn(round, a);
            if (mn.revoked) revert MemberRevoked(round, a);
            uint256 idx = mn.index;
            bool dup;
            if (idx < 256) {
                dup = (seen >> idx) & 1 == 1;
                seen |= 1 << idx;
            } else {
                for (uint256 j = 0; j < i; j++) if (members[j] == a) dup = true;
            }
            if (dup) revert MemberListedTwice(round, a);
        }
    }

    /// `node` was revoked in the registry: it leaves this training for good (and the open
    /// round: the last participant to check in takes its place, so this costs the same at any
    /// size and always fits the gas the registry gives each training).
    function _expel(address node, Member memory n, State memory s) internal {
        n.revoked = true;
        _member[node] = n;
        emit NodeRevoked(node);
        s.liveCount--;
        if (n.absent) s.absentCount--;
        else if (!n.finished) s.activeCount--;
        uint256 cur = s.currentRound;
        bool open = !s.elected;
        if (open && n.lastCheckinRound == cur) {
            uint256 last = uint256(s.openCount) - 1;
            uint256 p = cur & 1;
            uint256 i = 0;
            while (address(uint160(_entries[(i << 1) | p])) != node) i++;
            if (i != last) _entries[(i << 1) | p] = _entries[(last << 1) | p];
            _entries[(last << 1) | p] = 1;
            s.openCount--;
            if (!n.finished) s.openActive--;
            if (s.openCount == 0) s.openFirstAt = 0;
        }
        if (s.activeCount == 0 && s.finalRound == 0) _fixFinal(s, open);
        if (open && _allRequired(s, cur)) _elect(s, cur);
        else _s = s;
    }

    /// `node` (state `n`, written back by the caller) leaves the active sites as absent.
    function _absent(address node, Member memory n, State memory s) internal {
        n.absent = true;
        s.activeCount--;
        s.absentCount++;
        emit NodeAbsent(node, n.lastCheckinRound);
    }

    /// The absent `node` (state `n`, written back by the caller) is back among the active sites.
    function _return(address node, Member memory n, State memory s) internal {
        n.absent = false;
        s.activeCount++;
        s.absentCount--;
        emit NodeReturned(node);
    }

    /// Fix the final round: only for finished sites to take the model; never when every live
    /// site is absent (none finished, and the absent ones come back by checking in).
    function _fixFinal(State memory s, bool currentOpen) internal {
        if (s.liveCount == s.absentCount) return;
        s.finalRound = currentOpen ? s.currentRound : s.currentRound + 1;
        emit FinalRound(s.finalRound);
    }

    function _status(State memory s, uint256 round) internal view returns (RoundStatus) {
        if (round < s.currentRound) {
            return _abandoned(round) ? RoundStatus.Abandoned : RoundStatus.Committed;
        }
        if (round == s.currentRound && s.elected) return RoundStatus.Elected;
        return RoundStatus.Open;
    }

    function _abandoned(uint256 round) internal view returns (bool) {
        return (_abandonedBits[round >> 8] >> (round & 255)) & 1 == 1;
    }

    /// The merged digest of `round`: held for the previous round (0 for the current one, an
    /// abandoned one, and rounds before the previous: those are in the MergeCommitted events).
    function _digestOf(State memory s, uint256 round) internal view returns (bytes32) {
        if (round + 1 != s.currentRound || _abandoned(round)) return 0;
        return _ringDigest[round & 1];
    }

    /// A joined site that is not revoked (the registry pushes revocations here: `expel`).
    function _live(address who) internal view returns (Member memory n) {
        n = _member[who];
        if (n.revoked) revert Revoked(who);
        if (!n.joined) revert NotJoined(who);
    }

    function _notFinished() internal view {
        State memory s = _s;
        if (s.finished) revert TrainingOver(s.finalRound);
    }
}
