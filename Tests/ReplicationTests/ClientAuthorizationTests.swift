import QuiesceReplication
import Testing

/// `quiesce serve --allow`: which client may send which volume.
@Suite struct ClientAuthorizationTests {
    @Test func rulesGiveEachClientItsVolumesAndNothingToOthers() throws {
        let rules = try ClientAuthorization(parsing: ["primary-a=vm1,vm2", "primary-b=vm3", "primary-a=vm4", "admin=*"])
        #expect(rules.scope(for: "primary-a") == .only(["vm1", "vm2", "vm4"]))
        #expect(rules.scope(for: "primary-b").allows("vm3"))
        #expect(!rules.scope(for: "primary-b").allows("vm1"))
        #expect(rules.scope(for: "admin") == .all)
        // Not named, or no common name at all: nothing.
        #expect(rules.scope(for: "stranger") == .only([]))
        #expect(rules.scope(for: nil) == .only([]))
        // No rules: every client the CA signed may send every volume.
        #expect(try ClientAuthorization(parsing: []).scope(for: nil) == .all)
    }

    @Test func malformedRulesAreRefusedQuotingTheRule() {
        for (rule, says) in [("primary-a", "expected NAME=VOLUME"), ("=vm1", "expected NAME=VOLUME"),
                             ("primary-a=", "expected NAME=VOLUME"), ("primary-a=vm1,,vm2", "expected NAME=VOLUME"),
                             ("primary-a=../vm1", "volume name")] {
            let error = #expect(throws: DeltaStreamError.self) { try ClientAuthorization(parsing: [rule]) }
            #expect(error?.description.contains("--allow \"\(rule)\"") == true, "\(String(describing: error))")
            #expect(error?.description.contains(says) == true, "\(String(describing: error))")
        }
    }
}
