// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title SwarmLearning: enrolment, rounds and merge-leader election of one swarm training.
/// @notice One deployment per training. Sites (nodes) are authorised by the admin with the SHA-256
/// fingerprint of their TLS certificate, enrol with their peer endpoint, check in per round, and
/// the contract elects a merge leader among the checked-in nodes. The leader commits the merged
/// model's digest; only metadata and digests ever go on chain. Every step emits an event, so the
/// chain holds an audit log of the whole training.
/// A node whose process died stays enrolled; once it missed ABSENT_AFTER_ROUNDS rounds any node
/// may mark it absent (a leader that let its deadline pass is marked at once), and no round waits
/// for it any more. Checking in again brings it back.
/// @dev Gas layout: the global counters and the counters of the one open round share one slot
/// (`_s`); a node's flags, last-seen time and rounds share one slot; a round's leader,
/// attempt, participant count and times share one slot; each participant is one slot holding its
/// address and weight. A check-in therefore writes one new slot and updates two it has read.
/// A round's status is derived: before the current round it is Committed (digest set) or
/// Abandoned; the current round is Elected once `_s.elected`, else Open.
contract SwarmLearning {
    enum RoundStatus {
        Open, // accepting check-ins, no leader yet
        Elected, // leader drawn, merge not committed yet
        Committed, // merged digest recorded
        Abandoned // every participant failed as leader; the swarm moved on
    }

    /// A node's state in one slot (read and written whole).
    struct NodeState {
        uint40 lastSeen; // timestamp of the node's last state-changing call
        uint32 lastCheckinRound; // the last round the node checked in for
        uint32 failedRound; // the round in which it last failed as leader
        uint32 enrolledRound; // the current round when it enrolled
        uint16 index; // position in _nodeList
        bool authorized;
        bool enrolled;
        bool revoked;
        bool finished;
        bool absent; // marked absent (stopped taking part); a check-in clears it
    }

    struct Round {
        address leader; // 0 while open (and once abandoned)
        uint16 attempt; // 1 for the first election, +1 per re-election
        uint16 count; // participants, fixed at election
        uint32 electedAt;
        uint32 firstCheckinAt;
        bytes32 digest; // merged model digest, 0 until committed
        mapping(uint256 => uint256) entries; // i -> participant address | weight << 160
    }

    struct State {
        uint32 currentRound;
        uint32 finalRound; // 0 = not fixed yet
        uint16 activeCount; // enrolled, not revoked, not finished, not absent
        uint16 liveCount; // enrolled, not revoked (absent ones included)
        uint16 absentCount; // enrolled, not revoked, absent
        uint16 openCount; // participants of the open (current, unelected) round
        uint16 openActive; // ... of which active
        uint32 openFirstAt; // first check-in time of the open round
        bool elected; // the current round's participants are fixed and its leader is drawn
        bool finished; // the final round is committed
        uint32 drawBlock; // the block whose hash draws the current round's leader; 0: pinned
    }

    /// A node may be marked absent once the current round is this many rounds past the later of
    /// its last check-in and its enrolment round.
    uint32 public constant ABSENT_AFTER_ROUNDS = 2;

    bytes32 public immutable specHash;
    uint32 public immutable minPeers;
    uint32 public immutable graceSeconds;
    uint32 public immutable roundDeadline;
    address public immutable admin;
    /// @notice The largest weight a node may check in with (the spec's max_weight; 2^96-1: none).
    uint96 public immutable maxWeight;
    /// @notice The block this contract was deployed in: its event log starts there.
    uint256 public immutable deployedBlock;

    State private _s;
    address[] private _nodeList;
    mapping(address => NodeState) private _node;
    mapping(address => bytes32) private _fingerprint; // SHA-256 of the certificate's DER
    mapping(address => string) private _endpoint; // host:port of the node's peer API
    mapping(uint256 => Round) private _rounds;

    event SpecPublished(bytes32 indexed specHash, string specJson);
    event Authorized(address indexed node, bytes32 fingerprint);
    event Revoked(address indexed node);
    event Enrolled(address indexed node, string endpoint, bytes32 fingerprint);
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
    event FinalRound(uint256 indexed round);
    event TrainingFinished(uint256 indexed round, bytes32 digest);
    event MetricsReported(uint256 indexed round, address indexed node, int256 loss, int256 metric);

    constructor(
        bytes32 specHash_,
        string memory specJson,
        uint32 minPeers_,
        uint32 graceSeconds_,
        uint32 roundDeadlineSeconds_,
        uint96 maxWeight_
    ) {
        bytes32 actual = sha256(bytes(specJson));
        if (actual != specHash_) {
            revert(string.concat(
                "specHash ", _hex(specHash_), " is not the SHA-256 of specJson (",
                _hex(actual), "); pass sha256 of the UTF-8 spec JSON"
            ));
        }
        if (minPeers_ < 1) revert("minPeers is 0; it must be at least 1");
        if (roundDeadlineSeconds_ < 1) revert("roundDeadlineSeconds is 0; it must be at least 1");
        if (maxWeight_ < 1) revert("maxWeight is 0; it must be at least 1");
        maxWeight = maxWeight_;
        deployedBlock = block.number;
        specHash = specHash_;
        minPeers = minPeers_;
        graceSeconds = graceSeconds_;
        roundDeadline = roundDeadlineSeconds_;
        admin = msg.sender;
        _s.currentRound = 1;
        emit SpecPublished(specHash_, specJson);
    }

    // ------------------------------------------------------------------ admin

    /// @notice Authorise `node` with its certificate fingerprint; again to rotate the certificate.
    function authorize(address node, bytes32 certFingerprint) external {
        _onlyAdmin("authorize");
        _notFinished();
        if (node == address(0)) revert("node address is zero");
        if (certFingerprint == 0) {
            revert("certificate fingerprint is zero; pass the SHA-256 of the node certificate");
        }
        NodeState memory n = _node[node];
        if (n.revoked) {
            revert(string.concat(
                "node ", _addr(node), " was revoked and cannot be authorised again; ",
                "give the site a new key pair (address)"
            ));
        }
        _fingerprint[node] = certFingerprint;
        if (!n.authorized) {
            n.authorized = true;
            _node[node] = n;
        }
        emit Authorized(node, certFingerprint);
    }

    /// @notice Revoke `node`: it can do nothing any more and leaves the open round.
    function revoke(address node) external {
        _onlyAdmin("revoke");
        _notFinished();
        NodeState memory n = _node[node];
        if (!n.authorized) revert(string.concat("node ", _addr(node), " is not authorised"));
        if (n.revoked) revert(string.concat("node ", _addr(node), " is already revoked"));
        n.revoked = true;
        _node[node] = n;
        emit Revoked(node);
        if (!n.enrolled) return;

        State memory s = _s;
        s.liveCount--;
        if (n.absent) s.absentCount--;
        else if (!n.finished) s.activeCount--;
        uint256 cur = s.currentRound;
        Round storage rd = _rounds[cur];
        bool open = !s.elected;
        if (open && n.lastCheckinRound == cur) {
            // leave the open round's participants, keeping the check-in order of the others
            uint256 last = uint256(s.openCount) - 1;
            uint256 i = 0;
            while (address(uint160(rd.entries[i])) != node) i++;
            for (; i < last; i++) rd.entries[i] = rd.entries[i + 1];
            delete rd.entries[last];
            s.openCount--;
            if (!n.finished) s.openActive--;
            if (s.openCount == 0) s.openFirstAt = 0;
        }
        if (s.activeCount == 0 && s.finalRound == 0) _fixFinal(s, open);
        if (open && _allRequired(s, cur)) _elect(s, rd, cur);
        else _s = s;
    }

    // ------------------------------------------------------------------ nodes

    /// @notice Enrol the calling (authorised) node with its peer endpoint `host:port`.
    function enroll(string calldata endpoint) external {
        _notFinished();
        NodeState memory n = _node[msg.sender];
        if (n.revoked) _revertRevoked(msg.sender);
        if (!n.authorized) {
            revert(string.concat(
                "node ", _addr(msg.sender), " is not authorised; ask the admin to run ",
                "`swarmnode authorize ", _addr(msg.sender), " --cert <node.pem>`"
            ));
        }
        if (n.enrolled) {
            revert(string.concat(
                "node ", _addr(msg.sender),
                " is already enrolled; use updateEndpoint to change its endpoint"
            ));
        }
        if (bytes(endpoint).length == 0) revert("endpoint is empty; pass host:port");
        State memory s = _s;
        if (s.finalRound != 0) {
            revert(string.concat(
                "enrolment is closed: the final round ", _u(s.finalRound), " is fixed"
            ));
        }
        if (_nodeList.length >= type(uint16).max) revert("the swarm is full (65535 nodes)");
        n.index = uint16(_nodeList.length);
        n.enrolled = true;
        n.enrolledRound = s.currentRound;
        n.lastSeen = uint40(block.timestamp);
        _node[msg.sender] = n;
        _nodeList.push(msg.sender);
        _endpoint[msg.sender] = endpoint;
        s.activeCount++;
        s.liveCount++;
        _s = s;
        emit Enrolled(msg.sender, endpoint, _fingerprint[msg.sender]);
    }

    /// @notice Change the calling node's peer endpoint (a restart on a new port).
    function updateEndpoint(string calldata endpoint) external {
        _notFinished();
        NodeState memory n = _live(msg.sender);
        if (bytes(endpoint).length == 0) revert("endpoint is empty; pass host:port");
        _endpoint[msg.sender] = endpoint;
        n.lastSeen = uint40(block.timestamp);
        _node[msg.sender] = n;
        emit EndpointUpdated(msg.sender, endpoint);
    }

    /// @notice Check in for the open round with the node's merge weight; elects the leader when
    /// this check-in completes the set of required nodes. An absent node returns with it.
    function checkin(uint256 round, uint256 weight) external {
        State memory s = _s;
        if (s.finished) _revertFinished(s);
        NodeState memory n = _live(msg.sender);
        if (round != s.currentRound) {
            revert(string.concat(
                "round ", _u(round), " is not open for check-in; the current round is ",
                _u(s.currentRound)
            ));
        }
        if (s.elected) {
            revert(string.concat(
                "round ", _u(round), " is already elected (leader ",
                _addr(_leaderOf(s, _rounds[round], round)), "); take its merged model and check in",
                " for round ", _u(round + 1)
            ));
        }
        if (n.lastCheckinRound == round) {
            revert(string.concat(
                "node ", _addr(msg.sender), " already checked in for round ", _u(round)
            ));
        }
        if (weight > maxWeight) {
            revert(string.concat(
                "weight ", _u(weight), " is over this training's maximum weight ", _u(maxWeight),
                " (the spec's max_weight): no node may weigh more"
            ));
        }
        if (n.absent) _return(msg.sender, n, s);
        n.lastCheckinRound = uint32(round);
        n.lastSeen = uint40(block.timestamp);
        _node[msg.sender] = n;
        Round storage rd = _rounds[round];
        if (s.openCount == 0) s.openFirstAt = uint32(block.timestamp);
        rd.entries[s.openCount] = uint256(uint160(msg.sender)) | (weight << 160);
        s.openCount++;
        if (!n.finished) s.openActive++;
        emit CheckedIn(round, msg.sender, weight);
        if (_allRequired(s, round)) _elect(s, rd, round);
        else _s = s;
    }

    /// @notice Elect the leader of the open round once `minPeers` checked in and the grace
    /// period after the first check-in has passed. Any enrolled node may call it.
    function elect(uint256 round) external {
        State memory s = _s;
        if (s.finished) _revertFinished(s);
        _live(msg.sender);
        if (round != s.currentRound) {
            revert(string.concat(
                "round ", _u(round), " is not open; the current round is ", _u(s.currentRound)
            ));
        }
        Round storage rd = _rounds[round];
        if (s.elected) {
            revert(string.concat(
                "round ", _u(round), " is already elected (leader ", _addr(_leaderOf(s, rd, round)), ")"
            ));
        }
        if (s.openCount < minPeers) {
            revert(string.concat(
                "round ", _u(round), ": ", _u(s.openCount), " of ", _u(minPeers),
                " min peers checked in"
            ));
        }
        uint256 ready = uint256(s.openFirstAt) + graceSeconds;
        if (block.timestamp < ready) {
            revert(string.concat(
                "round ", _u(round), ": grace period ends at ", _u(ready), " (now ",
                _u(block.timestamp), ")"
            ));
        }
        _elect(s, rd, round);
    }

    /// @notice The round's leader records the merged model's digest and the members merged.
    function commitMerge(uint256 round, bytes32 digest, address[] calldata members) external {
        State memory s = _s;
        if (s.finished) _revertFinished(s);
        Round storage rd = _rounds[round];
        RoundStatus st = _status(s, rd, round);
        if (st != RoundStatus.Elected) {
            revert(string.concat(
                "round ", _u(round), " is ", _statusName(st),
                "; only an elected, uncommitted round can be committed"
            ));
        }
        address leader = _pin(s, rd, round);
        if (leader == address(0)) _revertUndrawn(s, round);
        if (msg.sender != leader) {
            revert(string.concat(
                "round ", _u(round), ": only its leader ", _addr(leader), " (attempt ",
                _u(rd.attempt), ") may commit; ", _addr(msg.sender), " is not"
            ));
        }
        if (_node[msg.sender].revoked) _revertRevoked(msg.sender);
        if (digest == 0) revert("digest is zero; pass the merged model's digest");
        uint256 m = members.length;
        uint256 count = rd.count;
        uint256 need = minPeers < count ? minPeers : count;
        if (m == 0 || m < need) {
            revert(string.concat(
                "round ", _u(round), ": ", _u(m), " members given, at least ", _u(need),
                " needed (min of minPeers and the ", _u(count), " participants)"
            ));
        }
        _checkMembers(round, members);
        rd.digest = digest;
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
    /// failed leader is marked absent unless it finished.
    function reelect(uint256 round) external {
        State memory s = _s;
        if (s.finished) _revertFinished(s);
        NodeState memory caller = _live(msg.sender);
        Round storage rd = _rounds[round];
        RoundStatus st = _status(s, rd, round);
        if (st != RoundStatus.Elected) {
            revert(string.concat(
                "round ", _u(round), " is ", _statusName(st),
                "; only an elected, uncommitted round can be re-elected"
            ));
        }
        if (caller.lastCheckinRound != round) {
            revert(string.concat(
                "round ", _u(round), ": only its participants may re-elect; ", _addr(msg.sender),
                " did not check in"
            ));
        }
        uint256 due = uint256(rd.electedAt) + roundDeadline;
        if (block.timestamp < due) {
            revert(string.concat(
                "round ", _u(round), ": leader ", _addr(_leaderOf(s, rd, round)), " has until ",
                _u(due), " to commit (now ", _u(block.timestamp), ")"
            ));
        }
        caller.lastSeen = uint40(block.timestamp); // a node that re-elects is not silent
        _node[msg.sender] = caller;
        address old = _pin(s, rd, round);
        if (old == address(0)) {
            // the draw block's hash is gone (over 256 blocks without a transaction for this
            // round): nobody failed yet; draw again from this block
            if (block.number <= s.drawBlock) _revertUndrawn(s, round);
            _close(s, rd, round, rd.attempt, rd.count);
            return;
        }
        NodeState memory on = _node[old];
        on.failedRound = uint32(round);
        emit LeaderFailed(round, old);
        // it evidently stopped answering: no later round waits for it (a check-in brings it
        // back), unless it is the last live site not set aside: then the swarm waits for it (a
        // chain stall fails every leader of a round; that must not end or empty the training)
        bool gone = on.enrolled && !on.revoked && !on.finished && !on.absent
            && s.liveCount > s.absentCount + 1;
        if (gone) _absent(old, on, s);
        _node[old] = on;
        if (gone && s.activeCount == 0 && s.finalRound == 0) _fixFinal(s, false);

        uint256 n = rd.count;
        (, uint256 k) = _candidates(rd, round, n);
        if (k == 0) {
            rd.leader = address(0);
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
    /// LeaderElected) for chains whose next block only comes with a transaction. Any enrolled node.
    function draw(uint256 round) external {
        State memory s = _s;
        if (s.finished) _revertFinished(s);
        _live(msg.sender);
        Round storage rd = _rounds[round];
        RoundStatus st = _status(s, rd, round);
        if (st != RoundStatus.Elected) {
            revert(string.concat(
                "round ", _u(round), " is ", _statusName(st), "; only an elected round has a draw"
            ));
        }
        if (rd.leader != address(0)) {
            revert(string.concat(
                "round ", _u(round), ": leader ", _addr(rd.leader), " is already drawn"
            ));
        }
        if (block.number <= s.drawBlock) _revertUndrawn(s, round);
        if (_pin(s, rd, round) == address(0)) _close(s, rd, round, rd.attempt, rd.count);
        else _s = s;
    }

    /// @notice The calling node's trainer is done. When no active node is left the final round
    /// is fixed; every enrolled node then takes part in it.
    function finish() external {
        State memory s = _s;
        if (s.finished) _revertFinished(s);
        NodeState memory n = _live(msg.sender);
        if (n.finished) revert(string.concat("node ", _addr(msg.sender), " already finished"));
        if (n.absent) _return(msg.sender, n, s);
        n.finished = true;
        n.lastSeen = uint40(block.timestamp);
        _node[msg.sender] = n;
        s.activeCount--;
        uint256 cur = s.currentRound;
        bool open = !s.elected;
        if (open && n.lastCheckinRound == cur) s.openActive--;
        emit NodeFinished(msg.sender);
        if (s.activeCount == 0 && s.finalRound == 0) _fixFinal(s, open);
        if (open && _allRequired(s, cur)) _elect(s, _rounds[cur], cur);
        else _s = s;
    }

    /// @notice Mark `node` absent: it missed the last ABSENT_AFTER_ROUNDS rounds and was silent
    /// for a round deadline, or silent for ABSENT_AFTER_ROUNDS + 1 deadlines (its process
    /// evidently died). It leaves the active nodes, so neither the open rounds nor the final round
    /// wait for it; if every other node finished, the final round is fixed. Checking in again
    /// brings it back. Any enrolled, non-revoked node may call it.
    function markAbsent(address node) external {
        State memory s = _s;
        if (s.finished) _revertFinished(s);
        _live(msg.sender);
        NodeState memory n = _node[node];
        if (n.revoked) {
            revert(string.concat("node ", _addr(node), " is revoked"));
        }
        if (!n.enrolled) revert(string.concat("node ", _addr(node), " is not enrolled"));
        if (n.finished) {
            revert(string.concat(
                "node ", _addr(node), " finished; it cannot be marked absent"
            ));
        }
        if (n.absent) {
            revert(string.concat(
                "node ", _addr(node), " is already absent"
            ));
        }
        uint256 cur = s.currentRound;
        if (n.lastCheckinRound == cur) {
            revert(string.concat("node ", _addr(node), " checked in for the current round"));
        }
        uint256 since = n.lastCheckinRound > n.enrolledRound ? n.lastCheckinRound : n.enrolledRound;
        // Silent for ABSENT_AFTER_ROUNDS + 1 deadlines is enough on its own: rounds stop moving
        // on when every other site finished and only waits for a dead one.
        uint256 silentUntil = uint256(n.lastSeen) + uint256(roundDeadline) * (ABSENT_AFTER_ROUNDS + 1);
        if (cur < since + ABSENT_AFTER_ROUNDS && block.timestamp < silentUntil) {
            string memory what = n.lastCheckinRound != 0
                ? " last checked in for round "
                : " enrolled in round ";
            revert(string.concat(
                "node ", _addr(node), what, _u(since),
                "; it can be marked absent from round ", _u(since + ABSENT_AFTER_ROUNDS),
                " (the current round is ", _u(cur), "), or once silent until ", _u(silentUntil)
            ));
        }
        // Rounds alone are not enough: a live site slower than the grace period misses rounds
        // too. Absent also means silent (no check-in) for longer than the round deadline.
        uint256 quietUntil = uint256(n.lastSeen) + roundDeadline;
        if (block.timestamp < quietUntil) {
            revert(string.concat(
                "node ", _addr(node), " was last seen at ", _u(n.lastSeen),
                "; it can be marked absent from ", _u(quietUntil), " (now ", _u(block.timestamp), ")"
            ));
        }
        _absent(node, n, s);
        _node[node] = n;
        bool open = !s.elected;
        if (s.activeCount == 0 && s.finalRound == 0) _fixFinal(s, open);
        if (open && _allRequired(s, cur)) _elect(s, _rounds[cur], cur);
        else _s = s;
    }

    /// @notice Record a node's loss and metric for a round (fixed point, x1e6). Event only; also
    /// accepted after the training finished, so the final model's evaluation is on record.
    function reportMetrics(uint256 round, int256 loss, int256 metric) external {
        NodeState storage n = _node[msg.sender];
        if (n.revoked || !n.enrolled) _live(msg.sender);
        _validRound(round);
        Round storage rd = _rounds[round];
        if (rd.digest == 0) {
            revert(string.concat(
                "round ", _u(round), " has no merged model on chain (not played, not committed ",
                "yet, or abandoned)"
            ));
        }
        if (n.lastCheckinRound != round && !_isParticipant(rd, msg.sender)) {
            revert(string.concat(
                "node ", _addr(msg.sender), " did not take part in round ", _u(round),
                "; only its participants report its metrics"
            ));
        }
        emit MetricsReported(round, msg.sender, loss, metric);
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
        return _nodeList;
    }

    function nodeInfo(address node)
        external
        view
        returns (
            bytes32 fingerprint,
            string memory endpoint,
            bool authorized,
            bool enrolled,
            bool revoked,
            bool finished,
            uint256 lastSeen,
            bool absent,
            uint256 lastCheckinRound,
            uint256 enrolledRound
        )
    {
        NodeState memory n = _node[node];
        return (_fingerprint[node], _endpoint[node], n.authorized, n.enrolled, n.revoked,
            n.finished, n.lastSeen, n.absent, n.lastCheckinRound, n.enrolledRound);
    }

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
        _validRound(round);
        State memory s = _s;
        Round storage rd = _rounds[round];
        status = _status(s, rd, round);
        leader = _leaderOf(s, rd, round);
        attempt = rd.attempt;
        electedAt = rd.electedAt;
        digest = rd.digest;
        isFinal = s.finalRound != 0 && round == s.finalRound;
        if (round == s.currentRound && !s.elected) {
            (participantCount, firstCheckinAt) = (s.openCount, s.openFirstAt);
        } else {
            (participantCount, firstCheckinAt) = (rd.count, rd.firstCheckinAt);
        }
    }

    function participants(uint256 round) public view returns (address[] memory out) {
        _validRound(round);
        (Round storage rd, uint256 n) = _participantsOf(round);
        out = new address[](n);
        for (uint256 i = 0; i < n; i++) out[i] = address(uint160(rd.entries[i]));
    }

    function checkinWeight(uint256 round, address node)
        external
        view
        returns (bool checkedIn, uint256 weight)
    {
        _validRound(round);
        (Round storage rd, uint256 n) = _participantsOf(round);
        for (uint256 i = 0; i < n; i++) {
            uint256 e = rd.entries[i];
            if (address(uint160(e)) == node) return (true, e >> 160);
        }
        return (false, 0);
    }

    // ------------------------------------------------------------------ internals

    function _participantsOf(uint256 round) internal view returns (Round storage rd, uint256 n) {
        rd = _rounds[round];
        State memory s = _s;
        n = round == s.currentRound && !s.elected ? s.openCount : rd.count;
    }

    /// Every node required for `round` has checked in: all active nodes, or in the final round
    /// every enrolled node that is neither revoked nor absent.
    function _allRequired(State memory s, uint256 round) internal view returns (bool) {
        if (s.openCount == 0) return false;
        if (round == s.finalRound) return s.openCount >= s.liveCount - s.absentCount;
        // min_peers holds here too: while fewer than minPeers nodes are enrolled, every one of
        // them checking in is not enough (finished nodes still count as enrolled, so a swarm
        // whose other trainers are done can go on with its last active node).
        return s.activeCount != 0 && s.openActive >= s.activeCount && s.liveCount >= minPeers;
    }

    /// Close the open round `round`: its participants are fixed (in check-in order) and its
    /// leader is drawn from this block's hash, which no participant knows when it sends its
    /// transaction (a draw from the previous block's hash let the last node to check in wait for
    /// a block that made it leader).
    function _elect(State memory s, Round storage rd, uint256 round) internal {
        uint256 n = s.openCount;
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
        if (attempt == 1) return address(uint160(rd.entries[seed % n]));
        (address[] memory candidates, uint256 k) = _candidates(rd, round, n);
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
    function _candidates(Round storage rd, uint256 round, uint256 n)
        internal
        view
        returns (address[] memory candidates, uint256 k)
    {
        candidates = new address[](n);
        for (uint256 i = 0; i < n; i++) {
            address p = address(uint160(rd.entries[i]));
            NodeState memory pn = _node[p];
            if (pn.failedRound != round && !pn.revoked) candidates[k++] = p;
        }
    }

    function _isParticipant(Round storage rd, address who) internal view returns (bool) {
        uint256 n = rd.count;
        for (uint256 i = 0; i < n; i++) {
            if (address(uint160(rd.entries[i])) == who) return true;
        }
        return false;
    }

    function _revertUndrawn(State memory s, uint256 round) internal pure {
        revert(string.concat(
            "round ", _u(round), ": its leader is drawn from the hash of block ", _u(s.drawBlock),
            ", not known yet; try again from a later block"
        ));
    }

    /// Every member checked in for `round` (the current round), is not revoked, and is listed once.
    function _checkMembers(uint256 round, address[] calldata members) internal view {
        uint256 m = members.length;
        uint256 seen; // bitmap of node indexes < 256; higher indexes are checked pairwise
        for (uint256 i = 0; i < m; i++) {
            address a = members[i];
            NodeState memory mn = _node[a];
            if (mn.lastCheckinRound != round || !mn.enrolled) {
                revert(string.concat(
                    "round ", _u(round), ": member ", _addr(a), " did not check in for this round"
                ));
            }
            if (mn.revoked) {
                revert(string.concat("round ", _u(round), ": member ", _addr(a), " is revoked"));
            }
            uint256 idx = mn.index;
            bool dup;
            if (idx < 256) {
                dup = (seen >> idx) & 1 == 1;
                seen |= 1 << idx;
            } else {
                for (uint256 j = 0; j < i; j++) if (members[j] == a) dup = true;
            }
            if (dup) {
                revert(string.concat(
                    "round ", _u(round), ": member ", _addr(a), " is listed twice"
                ));
            }
        }
    }

    /// `node` (state `n`, written back by the caller) leaves the active nodes as absent.
    function _absent(address node, NodeState memory n, State memory s) internal {
        n.absent = true;
        s.activeCount--;
        s.absentCount++;
        emit NodeAbsent(node, n.lastCheckinRound);
    }

    /// The absent `node` (state `n`, written back by the caller) is back among the active nodes.
    function _return(address node, NodeState memory n, State memory s) internal {
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

    function _status(State memory s, Round storage rd, uint256 round)
        internal
        view
        returns (RoundStatus)
    {
        if (round < s.currentRound) {
            return rd.digest != 0 ? RoundStatus.Committed : RoundStatus.Abandoned;
        }
        if (round == s.currentRound && s.elected) return RoundStatus.Elected;
        return RoundStatus.Open;
    }

    function _live(address who) internal view returns (NodeState memory n) {
        n = _node[who];
        if (n.revoked) _revertRevoked(who);
        if (!n.enrolled) {
            revert(string.concat(
                "node ", _addr(who), " is not enrolled; enrol it first (`swarmnode enroll`)"
            ));
        }
    }

    function _onlyAdmin(string memory what) internal view {
        if (msg.sender != admin) {
            revert(string.concat(
                "only the admin ", _addr(admin), " may ", what, "; ", _addr(msg.sender), " is not"
            ));
        }
    }

    function _notFinished() internal view {
        State memory s = _s;
        if (s.finished) _revertFinished(s);
    }

    function _validRound(uint256 round) internal pure {
        if (round == 0) revert("round 0 does not exist; rounds are numbered from 1");
    }

    function _revertFinished(State memory s) internal pure {
        revert(string.concat(
            "the training finished with round ", _u(s.finalRound), "; nothing more is accepted"
        ));
    }

    function _revertRevoked(address who) internal pure {
        revert(string.concat("node ", _addr(who), " is revoked; it can take no further part"));
    }

    function _statusName(RoundStatus st) internal pure returns (string memory) {
        if (st == RoundStatus.Open) return "open (no leader yet)";
        if (st == RoundStatus.Elected) return "elected";
        if (st == RoundStatus.Committed) return "already committed";
        return "abandoned";
    }

    function _u(uint256 v) internal pure returns (string memory) {
        if (v == 0) return "0";
        uint256 len;
        for (uint256 t = v; t != 0; t /= 10) len++;
        bytes memory b = new bytes(len);
        for (; v != 0; v /= 10) b[--len] = bytes1(uint8(48 + (v % 10)));
        return string(b);
    }

    /// EIP-55 checksummed hex of an address.
    function _addr(address a) internal pure returns (string memory) {
        bytes memory lower = new bytes(40);
        uint160 v = uint160(a);
        for (uint256 i = 40; i > 0; i--) {
            lower[i - 1] = _nibble(uint8(v & 0xf));
            v >>= 4;
        }
        bytes32 h = keccak256(lower);
        bytes memory out = new bytes(42);
        out[0] = "0";
        out[1] = "x";
        for (uint256 i = 0; i < 40; i++) {
            bytes1 c = lower[i];
            uint8 hn = uint8(h[i / 2]) >> (i % 2 == 0 ? 4 : 0) & 0xf;
            if (c >= "a" && hn >= 8) c = bytes1(uint8(c) - 32);
            out[i + 2] = c;
        }
        return string(out);
    }

    function _hex(bytes32 x) internal pure returns (string memory) {
        bytes memory out = new bytes(66);
        out[0] = "0";
        out[1] = "x";
        for (uint256 i = 0; i < 32; i++) {
            out[2 + 2 * i] = _nibble(uint8(x[i]) >> 4);
            out[3 + 2 * i] = _nibble(uint8(x[i]) & 0xf);
        }
        return string(out);
    }

    function _nibble(uint8 v) internal pure returns (bytes1) {
        return bytes1(v < 10 ? 48 + v : 87 + v);
    }
}
