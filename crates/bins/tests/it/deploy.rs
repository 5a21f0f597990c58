//! The AWS deployment files say what docs/aws.md and SECURITY.md promise:
//! the Lambda behind IAM-authenticated API Gateway with an IoT policy scoped
//! like the reference, and a test thing confined to its own topics.

use serde_json::Value;

fn load(path: &str) -> Value {
    let full = format!("{}/../../deploy/aws/{path}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}")))
        .unwrap_or_else(|e| panic!("{full}: {e}"))
}

/// Resources of a statement as strings (the `Fn::Sub` text when substituted).
fn resources(statement: &Value) -> Vec<String> {
    let one = |r: &Value| {
        r.as_str()
            .map(str::to_owned)
            .or_else(|| r["Fn::Sub"].as_str().map(str::to_owned))
            .unwrap()
    };
    match &statement["Resource"] {
        Value::Array(rs) => rs.iter().map(one).collect(),
        r => vec![one(r)],
    }
}

fn statements_for<'a>(statements: &'a [Value], action: &str) -> Vec<&'a Value> {
    statements
        .iter()
        .filter(|s| s["Action"] == action)
        .collect()
}

#[test]
fn the_lambda_template_is_scoped_like_the_reference() {
    let t = load("template.json");
    let f = &t["Resources"]["DirectcallFunction"];
    assert_eq!(f["Properties"]["Runtime"], "provided.al2023");
    assert_eq!(f["Properties"]["Architectures"][0], "arm64");
    assert_eq!(f["Metadata"]["BuildMethod"], "rust-cargolambda");
    assert_eq!(
        f["Metadata"]["BuildProperties"]["Binary"],
        "directcall-lambda"
    );
    assert_eq!(
        t["Resources"]["InvokeApi"]["Properties"]["Auth"]["DefaultAuthorizer"],
        "AWS_IAM"
    );
    assert_eq!(t["Parameters"]["MaxTimeoutSeconds"]["MaxValue"], 29);
    assert_eq!(
        f["Properties"]["Environment"]["Variables"]["DIRECTCALL_AUTH"],
        "sigv4"
    );
    let events = f["Properties"]["Events"].as_object().unwrap();
    let routes: Vec<(String, String)> = events
        .values()
        .map(|e| {
            (
                e["Properties"]["Method"].as_str().unwrap().to_owned(),
                e["Properties"]["Path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        routes.contains(&("GET".into(), "/invoke".into())),
        "{routes:?}"
    );
    assert!(
        routes.contains(&(
            "POST".into(),
            "/v1/targets/{target}/methods/{method}".into()
        )),
        "{routes:?}"
    );

    let statements = f["Properties"]["Policies"][0]["Statement"]
        .as_array()
        .unwrap();
    for s in statements {
        assert_eq!(s["Effect"], "Allow");
        assert!(
            s["Action"].as_str().unwrap().starts_with("iot:"),
            "only IoT actions: {s}"
        );
        assert_ne!(s["Action"], "iot:*");
    }
    let prefix = "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:";
    let one = |action: &str| {
        let s = statements_for(statements, action);
        assert_eq!(s.len(), 1, "{action}");
        resources(s[0])
    };
    // Each execution environment connects as <ClientIDPrefix>-<12 hex>, and
    // that client id is its reply prefix: `${!iot:ClientId}` (CloudFormation's
    // escape of IoT's `${iot:ClientId}`) confines it to its own replies.
    assert_eq!(
        one("iot:Connect"),
        [format!("{prefix}client/${{ClientIDPrefix}}-*")]
    );
    assert_eq!(
        one("iot:Publish"),
        [
            format!("{prefix}topic/*/*/${{!iot:ClientId}}/*"),
            format!("{prefix}topic/directcall/presence/*")
        ]
    );
    assert_eq!(
        one("iot:Subscribe"),
        [
            format!("{prefix}topicfilter/${{!iot:ClientId}}/*"),
            format!("{prefix}topicfilter/$aws/events/presence/*"),
            format!("{prefix}topicfilter/directcall/presence/*")
        ]
    );
    assert_eq!(
        one("iot:Receive"),
        [
            format!("{prefix}topic/${{!iot:ClientId}}/*"),
            format!("{prefix}topic/$aws/events/presence/*"),
            format!("{prefix}topic/directcall/presence/*")
        ]
    );
    let env = &f["Properties"]["Environment"]["Variables"];
    assert_eq!(env["DIRECTCALL_PREFIX"], env["DIRECTCALL_CLIENT_ID_PREFIX"]);
    assert_eq!(env["DIRECTCALL_PRESENCE"], "aws");
    assert_eq!(env["DIRECTCALL_PRESENCE_MIRROR"], "true");
}

#[test]
fn the_test_thing_may_only_read_its_requests_and_answer_as_itself() {
    let t = load("test-thing.json");
    let statements = t["Resources"]["TestThingPolicy"]["Properties"]["PolicyDocument"]["Statement"]
        .as_array()
        .unwrap();
    let prefix = "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:";
    let by = |action: &str| resources(statements_for(statements, action)[0]);
    // `${!…}` is CloudFormation's escape: IoT sees `${iot:ClientId}`.
    assert_eq!(
        by("iot:Subscribe"),
        [format!("{prefix}topicfilter/${{!iot:ClientId}}/*")]
    );
    assert_eq!(
        by("iot:Receive"),
        [format!("{prefix}topic/${{!iot:ClientId}}/*")]
    );
    assert_eq!(
        by("iot:Publish"),
        [
            format!("{prefix}topic/*/*/${{!iot:ClientId}}/*/ack"),
            format!("{prefix}topic/directcall/presence/${{!iot:ClientId}}")
        ]
    );
    let connect = statements_for(statements, "iot:Connect")[0];
    assert_eq!(
        resources(connect),
        [format!(
            "{prefix}client/${{!iot:Connection.Thing.ThingName}}"
        )]
    );
    assert_eq!(
        connect["Condition"]["Bool"]["iot:Connection.Thing.IsAttached"],
        "true"
    );
    for kind in [
        "AWS::IoT::PolicyPrincipalAttachment",
        "AWS::IoT::ThingPrincipalAttachment",
    ] {
        assert!(
            t["Resources"]
                .as_object()
                .unwrap()
                .values()
                .any(|r| r["Type"] == kind),
            "{kind}"
        );
    }
}

#[test]
fn the_standalone_policies_match_the_templates() {
    let device = load("policies/device-policy.json");
    let text = device.to_string();
    assert!(
        text.contains("topicfilter/${iot:ClientId}/*")
            && text.contains("topic/*/*/${iot:ClientId}/*/ack"),
        "{text}"
    );
    let requester = load("policies/requester-policy.json").to_string();
    assert!(
        requester.contains("client/invocation_client-*")
            && requester.contains("topic/*/*/${iot:ClientId}/*")
            && requester.contains("topicfilter/${iot:ClientId}/*"),
        "{requester}"
    );
}
